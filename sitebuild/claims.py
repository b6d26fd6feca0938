"""Claim markers: each checkable sentence of a page names the test that asserts it.

In a page's Markdown cell, a claim ends with ``{✓ test_name}``: a test of the
page's own test module (``tests/test_<page>.py``), or ``{✓ module::test_name}``
for a test of another page's module. The build turns the marker into a ✓ button
that opens (HTML popover, no script) the test's name, its tolerance, the sizes
and dtypes it runs at, and its source; it fails on a marker no test answers,
naming the page. ``tests/test_claims.py`` checks the other direction: every test
of a page's module is a claim some marker names, unless the module lists it in
``SUPPORTING_TESTS`` with the reason it is not one.
"""

import ast
import functools
import html
import re
from dataclasses import dataclass
from pathlib import Path

from sitebuild import pages

ROOT = Path(__file__).resolve().parents[1]
SITE_PATH = "claims.md"
# A marker may wrap after ✓ or after ::, to keep the page's lines short.
MARKER = re.compile(r"\{✓\s+(?:(?P<module>\w+)::\s*)?(?P<test>test_\w+)\}")
TOLERANCE_NAMES = {"atol", "rtol", "abs", "rel", "tol", "tolerance"}


class UnknownClaim(ValueError):
    """A marker names a test that does not exist."""


@dataclass(frozen=True)
class ClaimTest:
    module: str  # test_<page>
    name: str  # test_...
    source: str  # decorators and function, as written
    tolerances: tuple[str, ...]  # "rtol=1e-6", as written in the test
    runs_at: tuple[str, ...]  # "n_classes: [5, 32_000, 128_000]", as written

    @property
    def identifier(self) -> str:
        return f"{self.module}::{self.name}"


def module_for(page: str) -> str:
    return f"test_{page}"


def claim_tests(module: str, root: Path = ROOT) -> dict[str, ClaimTest]:
    """Every test function of ``tests/<module>.py``, read from its source."""
    path = root / "tests" / f"{module}.py"
    if not path.is_file():
        return {}
    source = path.read_text()
    return _claim_tests(module, source)


@functools.lru_cache(maxsize=256)  # a page names one module hundreds of times
def _claim_tests(module: str, source: str) -> dict[str, ClaimTest]:
    tree = ast.parse(source)
    lines = source.encode().splitlines(keepends=True)  # split once, not per segment
    constants = _module_constants(lines, tree)
    tests = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            tests[node.name] = ClaimTest(
                module,
                node.name,
                _source_with_decorators(source, node),
                _tolerances(lines, node, constants),
                _parameters(lines, node, constants),
            )
    return tests


def supporting_tests(module: str, root: Path = ROOT) -> dict[str, str]:
    """Tests a module declares are not claims (``SUPPORTING_TESTS``), with why."""
    path = root / "tests" / f"{module}.py"
    if not path.is_file():
        return {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", None) == "SUPPORTING_TESTS" for t in targets):
                return ast.literal_eval(node.value)
    return {}


def markers(markdown: str, page: str) -> list[tuple[str, str]]:
    """(module, test) of every marker in ``markdown``, in order."""
    return [
        (match["module"] or module_for(page), match["test"])
        for match in MARKER.finditer(markdown)
    ]


def resolve(module: str, test: str, page: str, root: Path = ROOT) -> ClaimTest:
    found = claim_tests(module, root).get(test)
    if found is None:
        raise UnknownClaim(
            f"{page}: the marker {{✓ {test}}} names no test: tests/{module}.py"
            f" has no function {test}. Name an existing test (see `pytest"
            f" --collect-only -q tests/{module}.py`), or write the test first."
        )
    return found


def render(page_html: str, page: str, root: Path = ROOT) -> str:
    """Markers replaced by buttons, each test's card added once after the page."""
    cards, ids = {}, MarkIds()

    def button(match: re.Match) -> str:
        module = match["module"] or module_for(page)
        test = resolve(module, match["test"], page, root)
        card_id, mark_id = ids.next(test.identifier)
        cards[card_id] = test
        # short ids and label: a page carries dozens of these (page weight); the
        # card names the test
        return (
            f'<button type="button" class="claim-mark" popovertarget="{card_id}"'
            f' id="{mark_id}" aria-label="Show its test">✓</button>'
        )

    page_html = MARKER.sub(button, page_html)
    return page_html + "".join(_card(*card) for card in cards.items())


class MarkIds:
    """Ids of a page's markers, in page order: ``claim-3`` is the first marker of
    the page's third test, ``claim-3-2`` its second; ``card-3`` is that test's card.
    The claims page numbers the Markdown's markers the same way to link to them."""

    def __init__(self):
        self.tests: dict[str, int] = {}
        self.seen: dict[str, int] = {}

    def next(self, identifier: str) -> tuple[str, str]:
        number = self.tests.setdefault(identifier, len(self.tests) + 1)
        self.seen[identifier] = occurrence = self.seen.get(identifier, 0) + 1
        mark = f"claim-{number}" + (f"-{occurrence}" if occurrence > 1 else "")
        return f"card-{number}", mark


def table_cell(text: str) -> str:
    """``text`` in a Markdown table cell: TeX's ``\\|`` as ``\\Vert``, other
    pipes escaped (an escaped ``\\|`` would end the cell)."""
    return text.replace("\\|", "\\Vert ").replace("|", "\\|")


SENTENCE_END = re.compile(r"[.!?]\s+|\n- |\n\n")
ABBREVIATIONS = ("e.g", "i.e", "et al", "cf", "vs", "eq", "Eq", "Fig")


def sentence_before(markdown: str, end: int) -> str:
    """The sentence or list item a marker starting at ``end`` closes, as text: from
    the last sentence end, list item or paragraph before it. Earlier markers are
    left out, not taken as ends: a clause marked in the middle of a sentence is
    listed with the start of its sentence, not as a fragment."""
    text = MARKER.sub("\0", markdown[:end])
    text = re.sub(r"\n[ \t\0]*\0[ \t\0]*(?=\n)", "", text)  # a marker's own line
    text = text.replace("\0", "").rstrip()  # "Sentence. {✓ t}" closes "Sentence."
    stops = [
        match.end()
        for match in SENTENCE_END.finditer(text)
        if not text[: match.start()].endswith(ABBREVIATIONS)
    ]
    text = text[max(stops, default=0) :]
    text = re.sub(r"^[\s\-.;:,]+", "", text)
    text = re.sub(r"\s+", " ", text)
    return re.sub(r"\s+([;:,.])", r"\1", text).strip()


def _card(card_id: str, test: ClaimTest) -> str:
    rows = [
        ("Test", f"<code>{test.module}.py::{test.name}</code>"),
        ("Tolerance", _listed(test.tolerances, "none named: exact or a bound")),
        ("Runs at", _listed(test.runs_at, "the inputs in its source, below")),
    ]
    table = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in rows)
    code = html.escape(test.source, quote=False)  # after Markdown: newlines stay
    return (
        f'<div popover id="{card_id}" class="claim-card" role="dialog"'
        ' aria-label="The test of this claim" data-search-exclude>'
        f"<dl>{table}</dl>"
        f'<pre><code class="language-python">{code}</code></pre>'
        f'<button type="button" popovertarget="{card_id}"'
        ' popovertargetaction="hide">Close</button></div>'
    )


def _listed(items: tuple[str, ...], otherwise: str) -> str:
    if not items:
        return otherwise
    return ", ".join(f"<code>{html.escape(item)}</code>" for item in items)


def _source_with_decorators(source: str, node: ast.FunctionDef) -> str:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    lines = source.splitlines()[first - 1 : node.end_lineno]
    return "\n".join(lines)


def _segment(lines: list[bytes], node: ast.AST) -> str:
    """``node``'s source text, as ``ast.get_source_segment`` gives it (its offsets
    count UTF-8 bytes) from lines split once."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first][node.col_offset : node.end_col_offset].decode()
    text = [lines[first][node.col_offset :], *lines[first + 1 : last]]
    return b"".join([*text, lines[last][: node.end_col_offset]]).decode()


def _module_constants(lines: list[bytes], tree: ast.Module) -> dict[str, str]:
    """``NAME = value`` at the top of a test module, as written."""
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            name = getattr(node.targets[0], "id", None)
            if name and name.isupper():
                constants[name] = _segment(lines, node.value)
    return constants


def _written(lines: list[bytes], node: ast.AST, constants: dict[str, str]) -> str:
    """The expression as written; a module constant with its value."""
    text = _segment(lines, node)
    return f"{text} = {constants[text]}" if text in constants else text


def _tolerances(lines, node, constants) -> tuple[str, ...]:
    found = []
    for child in ast.walk(node):
        if isinstance(child, ast.keyword) and child.arg in TOLERANCE_NAMES:
            found.append(f"{child.arg}={_written(lines, child.value, constants)}")
        elif isinstance(child, ast.keyword) and child.arg is None:  # **FLOAT64
            written = _written(lines, child.value, constants)
            if " = " in written and any(n in written for n in TOLERANCE_NAMES):
                found.append(written)  # a module constant naming tolerances
        elif isinstance(child, ast.Dict):
            for key, value in zip(child.keys, child.values, strict=True):
                if isinstance(key, ast.Constant) and key.value in TOLERANCE_NAMES:
                    found.append(f"{key.value}={_written(lines, value, constants)}")
    return tuple(dict.fromkeys(found))


def _parameters(lines, node, constants) -> tuple[str, ...]:
    found = []
    for decorator in node.decorator_list:
        if not isinstance(decorator, ast.Call):
            continue
        name = _segment(lines, decorator.func)
        if name.endswith("parametrize") and len(decorator.args) >= 2:
            names = _segment(lines, decorator.args[0]).strip("\"'")
            found.append(f"{names}: {_written(lines, decorator.args[1], constants)}")
        elif name.endswith("given"):
            found += [
                f"{k.arg}: {_written(lines, k.value, constants)}"
                for k in decorator.keywords
            ]
    return tuple(found)


def page_markers(page_path: Path) -> list[tuple[str, str, str]]:
    """(module, test, sentence) of every marker in a snippet page's Markdown."""
    found = []
    page = page_path.stem
    for cell in pages.read(page_path).cells:
        if cell.cell_type != "markdown":
            continue
        for match in MARKER.finditer(cell.source):
            module = match["module"] or module_for(page)
            sentence = sentence_before(cell.source, match.start())
            found.append((module, match["test"], sentence))
    return found


def coverage_problems(root: Path, not_yet_marked: set[str] = frozenset()) -> list:
    """What breaks the promise, both ways: a marker naming no test, and a test of
    a page's module that no marker names (unless listed in SUPPORTING_TESTS, or
    the page is one of ``not_yet_marked``: a page being marked)."""
    problems, named = [], set()
    page_files = sorted((root / "snippets").glob("[!_]*.py"))
    for page_path in page_files:
        for module, test, _ in page_markers(page_path):
            named.add((module, test))
            if test not in claim_tests(module, root):
                problems.append(
                    f"{page_path.stem}: {{✓ {test}}} names no test in tests/{module}.py"
                )
    for page_path in page_files:
        if page_path.stem in not_yet_marked:
            continue
        module = module_for(page_path.stem)
        supporting = supporting_tests(module, root)
        for test in claim_tests(module, root):
            if (module, test) not in named and test not in supporting:
                problems.append(
                    f"{page_path.stem}: tests/{module}.py::{test} is named by no"
                    " marker: mark the sentence it asserts with {✓ " + test + "},"
                    " or list it in SUPPORTING_TESTS with why it is not a claim"
                )
    return problems


def claims_pages(root: Path = ROOT, titles: dict[str, str] | None = None):
    """{path: Markdown}: the claims page (every page, its claims and tests
    counted) and, per page, the list of its claims: one page listing all of them
    would weigh 450 KB. Pages come in the order of ``titles`` (the reading order)."""
    titles = titles or {}
    sources = sorted((root / "snippets").glob("[!_]*.py"))
    in_order = sorted(sources, key=lambda path: _position(path.stem, titles))
    listed = {}
    for page_path in in_order:
        found = page_markers(page_path)
        if found:
            listed[page_path.stem] = found
    generated = {SITE_PATH: _overview(listed, titles)}
    for page, found in listed.items():
        generated[list_path(page)] = _page_claims(page, found, titles.get(page, page))
    return generated


def _position(page: str, titles: dict[str, str]) -> int:
    """Where ``page`` comes in the reading order ``titles`` follows; last if absent."""
    order = list(titles)
    return order.index(page) if page in order else len(order)


def list_path(page: str) -> str:
    return f"{SITE_PATH.removesuffix('.md')}/{page}.md"


def _overview(listed, titles) -> str:
    n_claims = sum(len(found) for found in listed.values())
    n_tests = len({(m, t) for found in listed.values() for m, t, _ in found})
    lines = [
        "# Every claim, and its test",
        "",
        "Each ✓ on this site marks a sentence that a test asserts. Select a ✓ on a",
        "page to see the test's source, its tolerance and the sizes and dtypes it",
        "runs at. Below, each page with the number of its claims and of the tests",
        "that assert them, linked to the list of its claims: each sentence, its",
        f"test and a link to its place. In all: {n_claims} claims, {n_tests} tests.",
        "",
        "What the site shows is what the tests check, not whether they passed: a",
        "page cannot know that. The deployment workflow",
        "(`.github/workflows/docs.yml`) publishes the site only after the whole",
        "suite, `make test`, passed on that commit; that workflow, not this page,",
        "is what enforces it.",
        "",
        "| The claims of | Claims | Tests |",
        "|---|--:|--:|",
    ]
    for page, found in listed.items():  # three columns: a phone shows them all
        n_page_tests = len({(m, t) for m, t, _ in found})
        lines.append(
            f"| [{titles.get(page, page)}]({list_path(page)}) | {len(found)} |"
            f" {n_page_tests} |"
        )
    return "\n".join(lines + [""])


def _page_claims(page, found, title) -> str:
    lines = [
        "---",
        "search:",
        "  exclude: true  # its sentences are found on their own page",
        "---",
        "",
        f"# Claims of “{title}”",
        "",
        f"Every ✓ of [{title}](../{page}.py), in page order: the sentence, and the",
        "test that asserts it, linked to the ✓ on the page. [All pages' claims]"
        f"(../{SITE_PATH})",
        "",
        "| Claim | Test |",
        "|---|---|",
    ]
    ids = MarkIds()
    for module, test, sentence in found:
        target = f"../{page}.py#{ids.next(f'{module}::{test}')[1]}"
        lines.append(f"| {listed_sentence(sentence, page)} | [`{test}`]({target}) |")
    return "\n".join(lines + [""])


def listed_sentence(sentence: str, page: str) -> str:
    """A sentence of ``page`` as a cell of its list under ``claims/``, its relative
    links pointing where they did: ``(#x)`` to the page's own section,
    ``(other.py)`` one level up."""
    sentence = re.sub(r"\]\(#", f"](../{page}.py#", sentence)
    return table_cell(re.sub(r"\]\((?![a-z]+:|/|\.\./|#)", "](../", sentence))
