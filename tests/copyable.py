"""What readers copy, as the tests see it: inline calls of the prose, evaluated.

``run_inline`` is how a test checks a call that the prose shows but no cell runs:
it evaluates the call exactly as written, with the imports the cheat sheet names.
``tests/test_prose.py`` counts a prose call as tested when some test passes that
very string to ``run_inline``.
"""

import ast
import re
import warnings
from pathlib import Path

import jupytext
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, Independent, Normal, kl_divergence

from sitebuild.pages import snippet_pages

ROOT = Path(__file__).resolve().parents[1]
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
FENCED_CODE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
IMPORTS = {
    "torch": torch,
    "F": F,
    "nn": nn,
    "Categorical": Categorical,
    "Independent": Independent,
    "Normal": Normal,
    "kl_divergence": kl_divergence,
}


def run_inline(code: str, **names):
    """``code`` (an expression, or statements) evaluated as the prose shows it, with
    ``names`` bound; the expression's value, or the names the statements bound.
    Any warning is an error: a copied call that warns is not right as shown."""
    namespace = IMPORTS | names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return eval(code, namespace)
        except SyntaxError:
            exec(code, namespace)
            return namespace


def normalised(code: str) -> str:
    return " ".join(code.split())


def prose_sources() -> dict[str, tuple[str, str]]:
    """Each page by name: (the Markdown a reader reads, every code cell that runs)."""
    sources = {}
    for page in snippet_pages():
        cells = jupytext.read(page).cells
        markdown = "\n".join(c.source for c in cells if c.cell_type == "markdown")
        code = "\n\n".join(c.source for c in cells if c.cell_type == "code")
        sources[page.stem] = (markdown, code)
    for page in sorted((ROOT / "docs").glob("*.md")):
        sources[page.stem] = (page.read_text(), "")
    return sources


def code_spans(markdown: str) -> list[str]:
    """Inline code and fenced blocks: what a reader selects and copies."""
    fenced = FENCED_CODE.findall(markdown)
    inline = INLINE_CODE.findall(FENCED_CODE.sub("", markdown))
    return [span.strip() for span in inline + fenced]


def parsed(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except SyntaxError:
        return None


def calls_in(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def called_name(call: ast.Call) -> str:
    function = call.func
    if isinstance(function, ast.Attribute):
        return function.attr
    return function.id if isinstance(function, ast.Name) else ""


def is_method_call(call: ast.Call) -> bool:
    """``x.softmax(-1)``, not ``F.softmax(x, -1)`` or ``torch.softmax(x, -1)``."""
    function = call.func
    if not isinstance(function, ast.Attribute):
        return False
    owner = ast.unparse(function.value)
    return owner not in {"F", "torch", "nn.functional", "torch.nn.functional"}


def unnamed_arguments(tree: ast.AST) -> list[str]:
    """Calls whose result depends on a default readers trip over: ``kl_div`` and
    ``KLDivLoss`` without ``reduction``, ``softmax``/``log_softmax`` without ``dim``."""
    problems = []
    for call in calls_in(tree):
        name, keywords = called_name(call), {k.arg for k in call.keywords}
        if name in {"kl_div", "KLDivLoss"} and "reduction" not in keywords:
            problems.append(f"{ast.unparse(call)}: name its reduction=")
        if name in {"softmax", "log_softmax", "Softmax", "LogSoftmax"}:
            needed = 1 if is_method_call(call) or name[0].isupper() else 2
            if "dim" not in keywords and len(call.args) < needed:
                problems.append(f"{ast.unparse(call)}: name its dim=")
    return problems


def strings_passed_to_run_inline(test_dir: Path = ROOT / "tests") -> set[str]:
    """Every literal string some test evaluates with ``run_inline``."""
    found = set()
    for path in test_dir.glob("*.py"):
        for call in calls_in(ast.parse(path.read_text())):
            if called_name(call) == "run_inline" and call.args:
                first = call.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found.add(normalised(first.value))
    return found
