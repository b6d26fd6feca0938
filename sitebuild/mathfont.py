"""A math font cut down to the characters the site's formulas use.

Browsers lay out MathML with an OpenType MATH font; readers' systems may have none,
so the site serves STIX Two Math (shipped in the ``ziamath`` wheel) itself, subset
at build time: about 70 KB instead of 1.5 MB, and nothing fetched from elsewhere.
"""

import hashlib
import importlib.util
import shutil
from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTFont

FONT_NAME = "STIXTwoMath-Regular.ttf"
SITE_PATH = "assets/fonts/math.woff"  # the stylesheet's @font-face points here


def font_source() -> Path:
    # find_spec locates the package without importing it (its import is slow)
    package = Path(importlib.util.find_spec("ziamath").origin).parent
    return package / "fonts" / FONT_NAME


def with_math_italics(characters: set[str]) -> set[str]:
    """Add the italic forms a browser substitutes for single-letter identifiers."""
    return characters | {italic for c in characters if (italic := _italic(c))}


def write_subset(
    characters: set[str], destination: Path, cache_dir: Path | None = None
) -> None:
    """Write a WOFF font holding ``characters``, their italics and stretchy forms;
    with ``cache_dir``, reuse the font made for the same characters before."""
    text = "".join(sorted(with_math_italics(characters)))
    cached = None
    if cache_dir is not None:
        key = hashlib.sha256((text + Path(__file__).read_text()).encode()).hexdigest()
        cached = cache_dir / f"math-{key[:16]}.woff"
        if cached.is_file():
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, destination)
            return
    options = subset.Options()
    options.flavor = "woff"
    options.layout_features = ["*"]  # keep the MATH table's size variants
    options.notdef_outline = True
    font = TTFont(font_source(), recalcTimestamp=False)  # same bytes every build
    subsetter = subset.Subsetter(options)
    subsetter.populate(text=text)
    subsetter.subset(font)
    destination.parent.mkdir(parents=True, exist_ok=True)
    font.flavor = "woff"
    font.save(destination, reorderTables=False)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(destination, cached)


def _italic(character: str) -> str | None:
    code = ord(character)
    if character == "h":
        return "\u210e"  # PLANCK CONSTANT stands in for the missing italic h
    if "a" <= character <= "z":
        return chr(0x1D44E + code - ord("a"))
    if "A" <= character <= "Z":
        return chr(0x1D434 + code - ord("A"))
    if "\u03b1" <= character <= "\u03c9":
        return chr(0x1D6FC + code - 0x3B1)
    if "\u0391" <= character <= "\u03a9":
        return chr(0x1D6E2 + code - 0x391)
    return None
