// Animations load nothing until they scroll into view, then play (muted, looping)
// while on screen. They stay still, poster and controls showing, for a reader who
// asked for reduced motion; and a video the reader paused stays paused.
// Without JavaScript they keep their controls and poster.
const reducedMotion = matchMedia("(prefers-reduced-motion: reduce)");
const pausedHere = new WeakSet(); // pauses this script made, not the reader's

const player = new IntersectionObserver(
  (entries) => {
    for (const { target: video, isIntersecting } of entries) {
      if (isIntersecting) {
        video.play().catch(() => {});
      } else if (!video.paused) {
        pausedHere.add(video);
        video.pause();
      }
    }
  },
  { threshold: 0.25 },
);

function playWhenVisible(video) {
  video.addEventListener("pause", () => {
    if (pausedHere.delete(video)) return;
    player.unobserve(video); // the reader paused it: it plays when they say so
  });
  player.observe(video);
}

if (!reducedMotion.matches) {
  document
    .querySelectorAll("video[data-play-when-visible]")
    .forEach(playWhenVisible);
}
