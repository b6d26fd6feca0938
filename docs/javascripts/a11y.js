// What Material's scripts leave out for keyboards and screen readers.
// - Each code block's buttons sit in an unnamed <nav>: a screen reader's list of
//   landmarks held dozens of identical "navigation" entries. Each gets a name.
// - A box that scrolls sideways (code, a printed result, a wide formula) must be
//   reachable by keyboard to be scrolled; Material makes code focusable only
//   where a pointer can hover, so on touch screens nothing was.
const SCROLLERS = [
  ".md-typeset pre > code",
  ".md-typeset pre",
  ".math-display",
  ".md-typeset__scrollwrap", // a wide table
].join(", ");

function nameCodeTools() {
  document.querySelectorAll("nav.md-code__nav").forEach((nav, index) => {
    const name = `Code block ${index + 1}: tools`;
    if (nav.getAttribute("aria-label") !== name) nav.setAttribute("aria-label", name);
  });
}

function focusScrollers() {
  for (const box of document.querySelectorAll(SCROLLERS)) {
    const overflow = getComputedStyle(box).overflowX;
    const scrolls =
      box.scrollWidth > box.clientWidth + 1 &&
      (overflow === "auto" || overflow === "scroll");
    if (scrolls && !box.hasAttribute("tabindex")) {
      box.tabIndex = 0;
      box.dataset.scrollFocus = ""; // set here: taken back if it stops scrolling
    } else if (!scrolls && "scrollFocus" in box.dataset) {
      box.removeAttribute("tabindex");
      delete box.dataset.scrollFocus;
    }
  }
}

new MutationObserver(nameCodeTools).observe(document.body, {
  childList: true,
  subtree: true,
});
nameCodeTools();
addEventListener("load", focusScrollers);
addEventListener("resize", focusScrollers);
