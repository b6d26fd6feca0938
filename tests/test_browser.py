"""Every page of the built site, visited in headless Chromium as a reader would.

Needs a Chromium: Debian's (``apt-get install -y chromium``, which ``.ci/run``
does), or any Chrome named by the CHROMIUM environment variable. Without one the
suite skips, except in CI, where a missing browser is a failure.
"""

import os
import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

from sitebuild.browser import (
    ALL_RULES,
    AXE,
    AXE_MISSING,
    CHROMIUM_FLAGS,
    COLOUR_RULES,
    LOAD_EVERY_IMAGE,
    axe_violations,
    chromium_path,
    show_in_scheme,
)

pytestmark = pytest.mark.slow

PHONE = {"width": 375, "height": 740}
DESKTOP = {"width": 1280, "height": 900}
TEX_LEFTOVERS = ["$", "\\(", "\\[", "\\frac", "\\mathrm", "\\log"]

# The page's visible prose: what is left once code, outputs and formulas are gone.
PROSE_TEXT = """() => {
  const body = document.body.cloneNode(true);
  body.querySelectorAll("pre, code, math, script, style, .jp-OutputArea")
      .forEach((element) => element.remove());
  return body.innerText;
}"""

# Scroll to the bottom in screen-sized steps so that lazy media start loading.
SCROLL_THROUGH = """async () => {
  // two screens a step: Chromium starts lazy loads well over a screen away
  for (let y = 0; y < document.body.scrollHeight; y += 2 * window.innerHeight) {
    window.scrollTo(0, y);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  window.scrollTo(0, 0);
}"""

UNPLAYABLE_VIDEOS = """async () => {
  const failures = [];
  for (const video of document.querySelectorAll("video")) {
    video.preload = "auto";
    video.load();
    const ready = await new Promise((resolve) => {
      video.addEventListener("canplay", () => resolve(true), { once: true });
      video.addEventListener("error", () => resolve(false), { once: true });
      setTimeout(() => resolve(false), 10000);
    });
    if (!ready || video.duration < 1) failures.push(video.currentSrc || video.src);
  }
  return failures;
}"""


@pytest.fixture(scope="session")
def browser():
    executable = chromium_path()
    if executable is None:
        message = (
            "no Chromium found: install one with `apt-get install -y chromium`"
            " (Debian) or set CHROMIUM=/path/to/chrome"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()


def site_pages() -> list[str]:
    from conftest import ROOT

    pages = ["/"] + sorted(
        f"/{path.stem}/"
        for path in (ROOT / "snippets").glob("*.py")
        if not path.name.startswith("_")
    )
    pages += sorted(
        f"/{path.stem}/"
        for path in (ROOT / "docs").glob("*.md")
        if path.stem != "index"
    )
    pages.append("/build/")  # made by the build: how long each page took
    pages.append("/claims/")  # made by the build: every claim and its test
    pages.append("/claims/checked_kl/")  # one page's list, the most claims
    return pages


# Every layout shift the reader did not cause, summed as Chromium reports them
# (cumulative layout shift, the one number Lighthouse and Core Web Vitals use).
LAYOUT_SHIFTS = """window.layoutShift = 0;
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) {
    if (!entry.hadRecentInput) window.layoutShift += entry.value;
  }
}).observe({ type: "layout-shift", buffered: true });"""
SETTLED_SHIFT = """async () => {
  await document.fonts.ready;
  await new Promise((resolve) => requestAnimationFrame(resolve));  // laid out
  return window.layoutShift;
}"""
# Printed results and code that do not fit their box, with the start of their text.
CLIPPED = """() => Object.fromEntries(
  [["output", ".jp-OutputArea pre"],
   ["code", ".jp-InputArea pre, .jp-RenderedMarkdown pre, .md-content pre > code"]]
  .map(([kind, selector]) => [kind, [...document.querySelectorAll(selector)]
    .filter((box) => box.scrollWidth > box.clientWidth + 1)
    .map((box) => box.textContent.trim().slice(0, 60))]))"""

# A reader on a slow connection gets the page before its fonts: the fonts come
# this much later than the page here, which moved rl_estimators by 0.17 when the
# math font swapped in.
LATE_FONT_S = 0.3


def late_font(route):
    time.sleep(LATE_FONT_S)
    route.continue_()


@dataclass
class Inspection:
    """What one page showed in Chromium: loaded on a phone, then on a laptop."""

    console_errors: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    foreign: list = field(default_factory=list)
    layout_shift: dict = field(default_factory=dict)  # screen -> CLS
    axe: dict = field(default_factory=dict)  # (scheme, screen) -> violations
    phone_scroll_width: int = 0
    clipped: dict = field(default_factory=dict)  # screen -> boxes wider than shown
    prose: str = ""
    math_count: int = 0
    first_math_height: float = 0
    broken_images: list = field(default_factory=list)
    unplayable_videos: list = field(default_factory=list)
    leaving: bool = False  # reloading: the first load's requests are cancelled


def inspect_page(browser, url: str) -> Inspection:
    """Load the page as a phone reader, then as a laptop reader, and note every
    check the tests make; the page's tests all read this one inspection."""
    found, host = Inspection(), urlsplit(url).netloc
    context = browser.new_context(viewport=PHONE)
    context.add_init_script(LAYOUT_SHIFTS)
    context.route("**/assets/fonts/*", late_font)
    page = context.new_page()
    page.on("console", lambda message: _console_error(found, message))
    page.on("pageerror", lambda error: found.console_errors.append(str(error)))
    page.on("requestfailed", lambda request: _failed_request(found, request))
    page.on("request", lambda request: _foreign(found, host, request.url))
    page.on("response", lambda response: _failed_response(found, response))
    try:
        page.goto(url, wait_until="load")
        _look_at_the_screen(found, page, "phone")
        found.phone_scroll_width = page.evaluate("document.documentElement.scrollWidth")
        page.set_viewport_size(DESKTOP)
        page.emulate_media(color_scheme="light")
        found.leaving = True  # a reload cancels what is still loading: not a fault
        page.reload(wait_until="load")
        found.leaving = False
        page.evaluate(SCROLL_THROUGH)  # start every lazy load
        found.broken_images = page.evaluate(LOAD_EVERY_IMAGE)
        found.unplayable_videos = page.evaluate(UNPLAYABLE_VIDEOS)
        found.prose = page.evaluate(PROSE_TEXT)
        found.math_count = page.locator("math").count()
        if found.math_count:
            box = page.locator("math").first.bounding_box()
            found.first_math_height = box["height"] if box else 0
        _look_at_the_screen(found, page, "laptop")
    finally:
        context.close()
    return found


def _look_at_the_screen(found: Inspection, page, screen: str) -> None:
    """Layout shift while loading, boxes too wide to show, axe in light and dark."""
    found.layout_shift[screen] = page.evaluate(SETTLED_SHIFT)
    found.clipped[screen] = page.evaluate(CLIPPED)
    if not AXE.is_file():
        return  # the axe test says so; the other checks still run
    found.axe["light", screen] = axe_violations(page, ALL_RULES)
    show_in_scheme(page, "dark")  # a reload or the next page starts light again
    found.axe["dark", screen] = axe_violations(page, COLOUR_RULES)


def _console_error(found: Inspection, message) -> None:
    if message.type == "error":
        found.console_errors.append(message.text)


def _failed_request(found: Inspection, request) -> None:
    # a browser cancels what it no longer needs: what a reload leaves behind, and
    # a video's fetch when it has enough of it or is told to load again
    cancelled = request.failure == "net::ERR_ABORTED"
    if not (cancelled and (found.leaving or request.resource_type == "media")):
        found.failed.append(f"{request.failure} {request.url}")


def _foreign(found: Inspection, host: str, url: str) -> None:
    scheme, netloc = urlsplit(url)[:2]
    if scheme in ("http", "https") and netloc != host:
        found.foreign.append(url)


def _failed_response(found: Inspection, response) -> None:
    if response.status >= 400:
        found.failed.append(f"{response.status} {response.url}")


@pytest.fixture(scope="session")  # kept while the worker runs other modules
def inspected(browser, site_url):
    """Each page inspected once, by the worker that runs its tests, on the first
    test that asks."""
    inspections = {}

    def inspection(path: str) -> Inspection:
        if path not in inspections:
            inspections[path] = inspect_page(browser, site_url + path)
        return inspections[path]

    return inspection


class PageChecks:
    """The checks made on every page, all reading the page's one inspection.
    Each page gets a class of its own below: pytest-xdist (--dist loadscope)
    sends a class's tests to one worker and spreads the classes over workers."""

    def test_page_loads_cleanly_from_its_own_host_only(self, inspected, path):
        page = inspected(path)
        assert page.console_errors == []
        assert page.failed == []
        assert page.foreign == [], "requests to other hosts"

    def test_page_shows_no_raw_tex_and_renders_its_math(
        self, inspected, path, built_site
    ):
        page = inspected(path)
        assert [tex for tex in TEX_LEFTOVERS if tex in page.prose] == []
        source_has_math = (
            "<math" in (built_site / path.strip("/") / "index.html").read_text()
        )
        assert (page.math_count > 0) == source_has_math
        if page.math_count:
            assert page.first_math_height > 5  # laid out, not left as text

    def test_every_image_and_video_loads(self, inspected, path):
        page = inspected(path)
        assert page.broken_images == []
        assert page.unplayable_videos == []

    def test_no_horizontal_overflow_on_a_phone(self, inspected, path):
        assert inspected(path).phone_scroll_width <= PHONE["width"]

    @pytest.mark.parametrize("screen", ["phone", "laptop"])
    def test_printed_results_fit_without_sideways_scrolling(
        self, inspected, path, screen
    ):
        assert inspected(path).clipped[screen]["output"] == []

    def test_code_fits_the_column_on_a_laptop(self, inspected, path):
        # on a phone code scrolls sideways, reachable by keyboard (a11y.js)
        assert inspected(path).clipped["laptop"]["code"] == []

    @pytest.mark.parametrize("screen", ["phone", "laptop"])
    def test_nothing_moves_while_the_page_loads_even_when_its_fonts_are_late(
        self, inspected, path, screen
    ):
        assert inspected(path).layout_shift[screen] < 0.02

    @pytest.mark.parametrize("scheme", ["light", "dark"])
    @pytest.mark.parametrize("screen", ["phone", "laptop"])
    def test_axe_finds_no_violation(self, inspected, path, scheme, screen):
        if not AXE.is_file():
            if os.environ.get("CI"):
                pytest.fail(AXE_MISSING)
            pytest.skip(AXE_MISSING)
        violations = inspected(path).axe[scheme, screen]
        assert violations == [], "\n".join(violations)


def _page_class(path: str) -> type:
    name = "".join(part.title() for part in re.split(r"[/_]", path) if part)
    marks = [pytest.mark.parametrize("path", [path])]
    return type(f"TestPage{name or 'Home'}", (PageChecks,), {"pytestmark": marks})


for _path in site_pages():
    _class = _page_class(_path)
    globals()[_class.__name__] = _class


def toggle_theme(page):
    page.locator("label.md-header__button[for^='__palette']:visible").first.click()


def test_theme_toggle_switches_to_dark_and_back(browser, site_url):
    page = browser.new_page()
    page.goto(site_url + "/kl_definition/")
    toggle_theme(page)
    assert page.evaluate("document.body.dataset.mdColorScheme") == "slate"
    toggle_theme(page)
    assert page.evaluate("document.body.dataset.mdColorScheme") == "default"
    page.close()


def test_dark_theme_follows_the_system_preference(browser, site_url):
    context = browser.new_context(color_scheme="dark")
    page = context.new_page()
    page.goto(site_url + "/")
    scheme = page.evaluate("document.body.dataset.mdColorScheme")
    context.close()
    assert scheme == "slate"


def test_a_page_switched_to_dark_for_axe_shows_every_dark_colour_at_once(
    browser, site_url
):
    page = browser.new_page()
    page.goto(site_url + "/kl_definition/")
    show_in_scheme(page, "dark")  # what the axe checks in dark do
    code = page.locator(".jp-InputArea pre").first
    backgrounds = [page.locator("body").evaluate(LUMINANCE), code.evaluate(LUMINANCE)]
    page.close()
    assert all(luminance < 0.2 for luminance in backgrounds), backgrounds


def test_figures_are_shown_on_white_in_the_dark_theme_too(browser, site_url):
    # they are drawn with dark-grey text for white (sitebuild/kernel/matplotlibrc)
    context = browser.new_context(color_scheme="dark")
    page = context.new_page()
    page.goto(site_url + "/kl_definition/")
    figure = page.locator(".jp-OutputArea img").first
    background = figure.evaluate("(img) => getComputedStyle(img).backgroundColor")
    context.close()
    assert background == "rgb(255, 255, 255)"


CHEAT_SHEET_LAYOUT = """() => {
  const table = document.querySelector(".cheat-sheet table");
  const box = table.closest(".md-typeset__scrollwrap");
  const cells = [...table.querySelectorAll("tbody td")].filter(
    (cell) => cell.textContent.trim());
  return {
    blocks: cells.every((cell) => getComputedStyle(cell).display === "block"),
    labels: [...new Set(cells.map(
      (cell) => getComputedStyle(cell, "::before").content))],
    sideways: box.scrollWidth - box.clientWidth,
  };
}"""


def test_the_cheat_sheet_reads_as_blocks_on_a_phone(browser, site_url):
    context = browser.new_context(viewport=PHONE)
    page = context.new_page()
    page.goto(site_url + "/")
    layout = page.evaluate(CHEAT_SHEET_LAYOUT)
    context.close()
    assert layout["blocks"]
    assert sorted(layout["labels"]) == ['"Call: "', '"Computes: "', '"Remember: "']
    assert layout["sideways"] <= 1  # nothing to scroll to


def test_copy_button_copies_a_notebook_code_cell(browser, site_url):
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.goto(site_url + "/kl_definition/")
    block = page.locator(".jp-InputArea pre").first
    block.locator("button.md-code__button[data-md-type=copy]").click()
    copied = page.evaluate("navigator.clipboard.readText()")
    shown = block.locator("code").inner_text()
    context.close()
    assert copied.startswith("import torch")
    assert copied.strip() == shown.strip()


def test_search_finds_prose_of_a_notebook_page(browser, site_url):
    page = browser.new_page()
    page.goto(site_url + "/")
    meta = page.locator(".md-search-result__meta")
    meta.filter(has_text="Type to start searching").wait_for(state="attached")
    page.locator("input.md-search__input").click()  # index ready: type as a reader
    page.locator("input.md-search__input").press_sequentially("exponentiate")
    results = page.locator(".md-search-result__item a")
    results.first.wait_for(timeout=10000)
    hrefs = [link.get_attribute("href") for link in results.all()]
    assert any("numerical_pitfalls" in href for href in hrefs)
    page.close()


LUMINANCE = """(element) => {
  const [r, g, b] = getComputedStyle(element).backgroundColor
      .match(/[\\d.]+/g).map(Number);
  return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255;
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_a_claim_marker_opens_its_test_from_the_keyboard(
    browser, site_url, viewport, scheme
):
    context = browser.new_context(viewport=viewport, color_scheme=scheme)
    page = context.new_page()
    page.goto(site_url + "/kl_definition/")
    mark = page.locator(".claim-mark").first
    card = page.locator("#" + mark.get_attribute("popovertarget"))
    assert not card.is_visible()
    mark.focus()
    page.keyboard.press("Enter")
    card.wait_for(state="visible")
    assert "def test_" in card.locator("pre").inner_text()
    box = card.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"]
    background = card.evaluate(LUMINANCE)
    assert background > 0.8 if scheme == "light" else background < 0.2
    page.keyboard.press("Escape")
    card.wait_for(state="hidden")
    context.close()


ANIMATED = "/forward_reverse_animated/"
VIDEO_STATES = """() => [...document.querySelectorAll("video")]
    .map((video) => ({ paused: video.paused, time: video.currentTime }))"""
PLAYING = "(video) => !video.paused && video.currentTime > 0"


def first_animation_playing(browser, site_url):
    """The animated page's first video, scrolled into view and playing."""
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.goto(site_url + ANIMATED)
    video = page.locator("video").first
    video.scroll_into_view_if_needed()
    page.wait_for_function(f"({PLAYING})(document.querySelector('video'))")
    return context, page, video


def test_an_animation_plays_once_it_is_on_screen(browser, site_url):
    context, _, _ = first_animation_playing(browser, site_url)
    context.close()


def test_animations_stay_still_for_a_reader_who_asked_for_reduced_motion(
    browser, site_url
):
    context = browser.new_context(viewport=DESKTOP, reduced_motion="reduce")
    page = context.new_page()
    page.goto(site_url + ANIMATED)
    for video in page.locator("video").all():
        video.scroll_into_view_if_needed()
        page.wait_for_timeout(1500)  # an animation on screen plays well within this
    states = page.evaluate(VIDEO_STATES)
    context.close()
    assert len(states) >= 2
    assert all(state["paused"] and state["time"] == 0 for state in states), states


def test_a_video_the_reader_paused_stays_paused_when_it_comes_back_into_view(
    browser, site_url
):
    context, page, video = first_animation_playing(browser, site_url)
    video.evaluate("(video) => video.pause()")  # what the pause control does
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # out of view
    page.wait_for_timeout(500)
    video.scroll_into_view_if_needed()  # and back
    page.wait_for_timeout(1500)
    paused = video.evaluate("(video) => video.paused")
    context.close()
    assert paused


SCROLLERS = """() => {
  const boxes = [...document.querySelectorAll(
    ".md-typeset pre > code, .md-typeset pre, .math-display,"
    + " .md-typeset__scrollwrap")]
    .filter((box) => box.scrollWidth > box.clientWidth + 1
      && ["auto", "scroll"].includes(getComputedStyle(box).overflowX));
  return { scrolling: boxes.length,
           unreachable: boxes.filter((box) => box.tabIndex < 0).length };
}"""


def test_boxes_that_scroll_sideways_on_a_phone_are_reachable_by_keyboard(
    browser, site_url
):
    # a touch screen: Material makes code focusable only where a pointer hovers
    context = browser.new_context(viewport=PHONE, has_touch=True, is_mobile=True)
    page = context.new_page()
    page.goto(site_url + "/kl_definition/", wait_until="load")
    boxes = page.evaluate(SCROLLERS)
    context.close()
    assert boxes["scrolling"] > 0  # the page has some: the check looked at them
    assert boxes["unreachable"] == 0, boxes


def test_each_code_blocks_tools_have_a_name_of_their_own(browser, site_url):
    page = browser.new_page()
    page.goto(site_url + "/kl_definition/", wait_until="load")
    labels = page.evaluate(
        "[...document.querySelectorAll('nav.md-code__nav')]"
        ".map((nav) => nav.getAttribute('aria-label'))"
    )
    page.close()
    assert len(labels) > 1 and None not in labels
    assert len(set(labels)) == len(labels)  # landmarks a screen reader can tell apart
