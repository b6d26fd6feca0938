"""What readers copy from the prose is code that runs and names what matters.

Every inline call and fenced block of a page's Markdown either appears as written
in a code cell of that page (which the build runs), or is evaluated by a test with
``run_inline`` (tests/copyable.py), or is listed with the reason it is not meant to
be run (library source quoted, a quantity named) in ``QUOTED_IN_PROSE`` of the
page's test module. Every ``kl_div`` a reader can copy, in prose or code, names its
``reduction``; every ``softmax`` its ``dim``.
"""

import ast
from pathlib import Path

import pytest
from copyable import (
    code_spans,
    normalised,
    parsed,
    prose_sources,
    strings_passed_to_run_inline,
    unnamed_arguments,
)
from test_cheat_sheet import cheat_sheet_rows, home_code_blocks

SOURCES = prose_sources()
TESTS = Path(__file__).resolve().parent
TEST_MODULE_OF = {"index": "test_cheat_sheet.py"}  # else test_<page>.py


def quoted_in_prose(name: str) -> dict[str, str]:
    """The page's test module's ``QUOTED_IN_PROSE``: span -> why it is not run."""
    path = TESTS / TEST_MODULE_OF.get(name, f"test_{name}.py")
    if not path.exists():
        return {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", "") == "QUOTED_IN_PROSE" for t in targets):
                return ast.literal_eval(node.value)
    return {}


def uncovered_calls(name: str, tested: set[str]) -> list[str]:
    markdown, code = SOURCES[name]
    runs, quoted = normalised(code), quoted_in_prose(name)
    missing = []
    for span in code_spans(markdown):
        tree = parsed(span)
        if tree is None or not any(isinstance(n, ast.Call) for n in ast.walk(tree)):
            continue
        text = normalised(span)
        if text in runs or text in tested or span in quoted:
            continue
        missing.append(span)
    return missing


@pytest.fixture(scope="module")
def tested_strings():
    # the home page's table rows and code blocks are run by test_cheat_sheet.py
    cheat_sheet_calls = {normalised(call) for _, call, _ in cheat_sheet_rows()}
    blocks = {normalised(block) for block in home_code_blocks()}
    return strings_passed_to_run_inline() | cheat_sheet_calls | blocks


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_inline_call_runs_on_the_page_or_in_a_test(name, tested_strings):
    missing = uncovered_calls(name, tested_strings)
    assert not missing, (
        f"{name}: these calls in the prose run in no cell and no test; put them in "
        f"a cell as written or check them with run_inline: {missing}"
    )


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_kl_div_names_its_reduction_and_every_softmax_its_dim(name):
    markdown, code = SOURCES[name]
    problems = unnamed_arguments(ast.parse(code))
    for span in code_spans(markdown):
        tree = parsed(span)
        if tree is not None:
            problems += unnamed_arguments(tree)
        elif "kl_div(" in span and "reduction" not in span:
            problems.append(f"{span}: name its reduction=")
    assert not problems, f"{name}: {problems}"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_prose_has_no_control_characters(name):
    # "\theta" typed in a normal string becomes a TAB and "heta": broken maths
    markdown, code = SOURCES[name]
    bad = sorted({hex(ord(c)) for c in markdown + code if ord(c) < 32 and c != "\n"})
    assert not bad, f"{name}: control characters {bad}; escape the backslash"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_quoted_span_is_still_on_its_page(name):
    gone = set(quoted_in_prose(name)) - set(code_spans(SOURCES[name][0]))
    assert not gone, f"{name}: QUOTED_IN_PROSE lists spans no longer shown: {gone}"


@pytest.mark.parametrize(
    "code, flagged",
    [
        ('F.kl_div(log_q, p, reduction="sum")', False),
        ("F.kl_div(log_q, p)", True),
        ("F.kl_div(log_q, log_p, log_target=True)", True),
        ("nn.KLDivLoss()", True),
        ('nn.KLDivLoss(reduction="batchmean")', False),
        ("logits.log_softmax(-1)", False),
        ("logits.log_softmax(dim=-1)", False),
        ("logits.softmax()", True),
        ("F.log_softmax(x)", True),
        ("F.log_softmax(x, -1)", False),
        ("torch.softmax(x, dim=0)", False),
        ("log_softmax(z_s / T)", True),
        ("nn.LogSoftmax()", True),
    ],
)
def test_scanner_flags_exactly_the_calls_without_reduction_or_dim(code, flagged):
    assert bool(unnamed_arguments(ast.parse(code))) is flagged


def test_scanner_finds_inline_and_fenced_code_but_not_double_backticks():
    markdown = "Use `F.kl_div(a, b)` here.\n\n```python\nx.softmax(-1)\n```\n``a``"
    assert code_spans(markdown) == ["F.kl_div(a, b)", "x.softmax(-1)"]
