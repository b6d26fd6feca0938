"""`make bench`: how fast the site builds and tests, measured on a copy.

Everything runs in a temporary copy of the checkout (the files git tracks or would
track), so the checkout's caches are neither used nor disturbed: the first build
there is a clean one. Prints a Markdown table, and writes it to .cache/bench.md.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOALS = {
    "clean build": 60.0,
    "rebuild, nothing changed": 5.0,
    "rebuild, one page edited": None,
    # the project's bar: a new machine's CI, from `git clone` to the last test
    "fresh clone: .ci/run, set-up included": 300.0,
    "make test again in that clone": None,
}
EDITED_PAGE = "reductions"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kl-site-bench-") as scratch:
        copy = copy_checkout(Path(scratch) / "site-project")
        timings, notes = measure(copy)
        report = render(timings, notes, copy, import_seconds(copy))
    report += "\n" + render_chunked_kl(chunked_kl_benchmark())
    output = ROOT / ".cache" / "bench.md"
    output.parent.mkdir(exist_ok=True)
    output.write_text(report)
    print(report)
    print(f"(written to {output.relative_to(ROOT)})")


def copy_checkout(destination: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def run(
    command: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[float, subprocess.CompletedProcess]:
    python = shutil.which("python3.11") or sys.executable  # what make set-up uses
    path = f"{Path(sys.executable).parent}:{Path(python).parent}:/usr/bin:/bin"
    started = time.perf_counter()
    result = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        env={
            "NO_MKDOCS_2_WARNING": "1",
            "PATH": path,
            "HOME": os.environ.get("HOME", "/root"),  # pip's download cache
            **(env or {}),
        },
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-3000:]
        raise SystemExit(f"{' '.join(command)} failed:\n{output}")
    return seconds, result


def build(copy: Path, site: str = "site"):
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", site]
    return run(command, copy)


def executed(result) -> list[str]:
    return sorted(
        line.split("executed snippets/")[1].split(".py")[0]
        for line in result.stderr.splitlines()
        if "executed snippets/" in line
    )


def measure(copy: Path):
    timings, notes = {}, {}
    timings["clean build"], _ = build(copy)
    timings["rebuild, nothing changed"], unchanged = build(copy)
    notes["rebuild, nothing changed"] = f"executed: {executed(unchanged) or 'none'}"
    page = copy / "snippets" / f"{EDITED_PAGE}.py"
    page.write_text(page.read_text() + "\n# an edit for the benchmark\n")
    timings["rebuild, one page edited"], edited = build(copy)
    notes["rebuild, one page edited"] = f"executed: {executed(edited)}"

    shutil.rmtree(copy / ".cache" / "pages")  # a second clean execution
    shutil.rmtree(copy / ".cache" / "mkdocs-jupyter", ignore_errors=True)
    _, _ = build(copy, "site-again")
    notes["clean build"] = same_site(copy / "site", copy / "site-again")
    shutil.rmtree(copy / "site-again")  # it holds .py files the linter would see

    clone = copy.parent / "fresh-clone"  # what CI gets: the last commit, no cache
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    label = "fresh clone: .ci/run, set-up included"
    timings[label], _ = run(["bash", ".ci/run"], clone, {"CI": "true"})
    notes[label] = "the last commit; .venv, site and every cache made from nothing"
    label = "make test again in that clone"
    timings[label], _ = run(["make", "test"], clone)
    notes[label] = "the edit loop: the site's and the copy-paste runs' caches reused"
    return timings, notes


def same_site(first: Path, second: Path) -> str:
    """Whether two builds published the same bytes (the timing page aside)."""
    differ = [
        str(path.relative_to(first))
        for path in sorted(first.rglob("*"))
        if path.is_file()
        and "build" not in path.relative_to(first).parts[:1]
        and path.name not in ("search_index.json", "sitemap.xml.gz")
        and path.read_bytes() != (second / path.relative_to(first)).read_bytes()
    ]
    if not differ:
        return "second clean build: same bytes (the timing page aside)"
    first_lines = (first / differ[0]).read_text(errors="replace").splitlines()
    second_lines = (second / differ[0]).read_text(errors="replace").splitlines()
    changed = next(
        (
            f"{a[:120]!r} vs {b[:120]!r}"
            for a, b in zip(first_lines, second_lines, strict=False)
            if a != b
        ),
        "lengths differ",
    )
    return f"second clean build differs: {differ[:5]}; first change: {changed}"


# Each page's import, in one interpreter that has torch loaded already: what a test
# or a reader's `import` pays for the page itself (the goal: well under a second).
IMPORT_EACH = """
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
seconds = {}
for name in sys.argv[2:]:
    started = time.perf_counter()
    __import__("snippets." + name)
    seconds[name] = time.perf_counter() - started
print(json.dumps(seconds))
"""


def import_seconds(copy: Path) -> dict[str, float]:
    names = sorted(
        path.stem
        for path in (copy / "snippets").glob("*.py")
        if not path.name.startswith("_")
    )
    _, result = run([sys.executable, "-c", IMPORT_EACH, str(copy), *names], copy)
    return json.loads(result.stdout)


def render(timings, notes, copy: Path, imports: dict[str, float]) -> str:
    lines = [
        f"Measured {date.today()} on {platform.machine()}, {cpu_count()} cores,"
        f" Python {platform.python_version()}.",
        "",
        "| Step | Seconds | Goal | Note |",
        "|---|---|---|---|",
    ]
    for step, seconds in timings.items():
        goal = GOALS.get(step)
        verdict = (
            ""
            if goal is None
            else f"≤ {goal:.0f} {'met' if seconds <= goal else 'MISSED'}"
        )
        lines.append(f"| {step} | {seconds:.1f} | {verdict} | {notes.get(step, '')} |")
    lines += [
        "",
        "| Page | Executed in (s) | Import (s) | HTML (KB) | Media |",
        "|---|---|---|---|---|",
    ]
    for done in sorted((copy / ".cache" / "pages").glob("*/done.json")):
        name = done.parent.name.rsplit("-", 1)[0]
        seconds = json.loads(done.read_text())["seconds"]
        html = (copy / "site" / name / "index.html").stat().st_size / 1024
        media = [
            f"{path.name} {path.stat().st_size / 1024:.0f} KB"
            for path in sorted((copy / "site" / name).glob("*"))
            if path.suffix in (".mp4", ".png")
        ]
        lines.append(
            f"| {name} | {seconds:.1f} | {imports[name]:.2f} | {html:.0f}"
            f" | {', '.join(media)} |"
        )
    return "\n".join(lines) + "\n"


# One variant of the large-vocabulary KL, forward and backward, in a fresh process:
# its peak resident memory above the inputs (Linux's VmHWM, reset before each run)
# and its time, the best of three runs.
KL_RUN = """
import json, re, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from snippets.large_vocab import chunked_kl, straightforward_kl

variant, rows, vocab = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
loss_fn = {"straightforward": straightforward_kl, "chunked": chunked_kl}[variant]
generator = torch.Generator().manual_seed(0)
student = torch.randn(rows, vocab, generator=generator).requires_grad_()
teacher = torch.randn(rows, vocab, generator=generator)

def memory(key):
    status = open("/proc/self/status").read()
    return int(re.search(key + r":\\s+(\\d+) kB", status).group(1)) * 1024

loss_fn(student[:8], teacher[:8]).backward()  # warm up
seconds, peaks = [], []
for _ in range(3):
    student.grad = None
    with open("/proc/self/clear_refs", "w") as reset:
        reset.write("5")  # VmHWM := VmRSS
    before = memory("VmRSS")
    started = time.perf_counter()
    loss_fn(student, teacher).backward()
    seconds.append(time.perf_counter() - started)
    peaks.append(memory("VmHWM") - before)
print(json.dumps({"seconds": min(seconds), "peak": max(peaks)}))
"""
KL_ROWS, KL_VOCAB = 1024, 128_000


def chunked_kl_benchmark(rows=KL_ROWS, vocab=KL_VOCAB) -> dict:
    results = {}
    for variant in ["straightforward", "chunked"]:
        command = [sys.executable, "-c", KL_RUN, str(ROOT), variant, str(rows)]
        _, result = run(command + [str(vocab)], ROOT)
        results[variant] = json.loads(result.stdout)
    return results


def render_chunked_kl(results) -> str:
    plain, chunked = results["straightforward"], results["chunked"]
    tensor_mb = KL_ROWS * KL_VOCAB * 4 / 2**20
    lines = [
        f"Large-vocabulary KL, forward and backward: {KL_ROWS} rows × {KL_VOCAB}"
        f" classes, float32 ({tensor_mb:.0f} MB per logits table); peak memory above"
        " the inputs (the gradient included), best time of three.",
        "",
        "| Version | Peak memory (MB) | Time (s) |",
        "|---|---|---|",
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | {result['peak'] / 2**20:.0f} | {result['seconds']:.2f} |"
        )
    memory_ratio = chunked["peak"] / plain["peak"]
    speed_ratio = chunked["seconds"] / plain["seconds"]
    verdict = "met" if memory_ratio <= 0.25 and speed_ratio <= 1.0 else "MISSED"
    lines += [
        "",
        f"Chunked / straightforward: memory {memory_ratio:.2f} (goal ≤ 0.25),"
        f" time {speed_ratio:.2f} (goal ≤ 1): {verdict}.",
    ]
    return "\n".join(lines) + "\n"


def cpu_count() -> int:
    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
