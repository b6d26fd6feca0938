// Animations load nothing until they scroll into view, then play (muted, looping)
// while on screen. Without JavaScript they keep their controls and poster.
const player = new IntersectionObserver(
  (entries) => {
    for (const { target: video, isIntersecting } of entries) {
      if (isIntersecting) video.play().catch(() => {});
      else video.pause();
    }
  },
  { threshold: 0.25 },
);
document
  .querySelectorAll("video[data-play-when-visible]")
  .forEach((video) => player.observe(video));
