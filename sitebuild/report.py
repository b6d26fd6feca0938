"""The "How this site was built" page: each page's execution time and media."""

from sitebuild.execute import ExecutedPage

SITE_PATH = "build.md"


def build_report(executed: dict) -> str:
    """Markdown listing every snippet page, how long it took to execute when it
    last ran, and the figures and animations it published."""
    rows = [_row(page) for page in sorted(executed.values(), key=_by_time)]
    total = sum(page.seconds for page in executed.values())
    return "\n".join(
        [
            "# How this site was built",
            "",
            "Every page below is a Python module that the build executed, in its own",
            "kernel and all at once; a page runs again only when something it depends",
            "on changes (see the README). Times are from each page's last execution",
            "on the machine that built this site.",
            "",
            "| Page | Executed in | Figures | Animations |",
            "|---|---|---|---|",
            *rows,
            "",
            f"The times add up to {total:.1f} s; each was measured with the other",
            "pages running beside it, so alone a page runs faster.",
            "",
        ]
    )


def _by_time(page: ExecutedPage) -> float:
    return -page.seconds


def _row(page: ExecutedPage) -> str:
    figures = [path for path in page.media if path.name.startswith("figure-")]
    videos = [path for path in page.media if path.suffix == ".mp4"]
    return (
        f"| [{page.source.stem}]({page.source.name}) | {page.seconds:.1f} s"
        f" | {_files(figures)} | {_files(videos)} |"
    )


def _files(paths) -> str:
    if not paths:
        return "none"
    kilobytes = sum(path.stat().st_size for path in paths) / 1024
    return f"{len(paths)} ({kilobytes:.0f} KB)"
