"""The executed pages' cache can make a build faster, never stale."""

import shutil

import pytest
from conftest import ROOT, mkdocs_build, write_project

from sitebuild import execute, postprocess

pytestmark = pytest.mark.slow

HELPER = "snippets/_helper.py"
USES_HELPER = "from snippets._helper import VALUE\nprint(f'helper value {VALUE}')"
STANDALONE = "print('standalone page, version 1')"


def executed_pages(build):
    """Which pages a build executed, from its log."""
    return sorted(
        line.split("executed snippets/")[1].split(".py")[0]
        for line in build.stderr.splitlines()
        if "executed snippets/" in line
    )


def page_html(project, name):
    return (project / "site" / name / "index.html").read_text()


@pytest.fixture(scope="module")
def built_project(tmp_path_factory):
    """A small site with two pages, built once: its cache holds both."""
    project = tmp_path_factory.mktemp("project")
    pages = {"uses_helper": USES_HELPER, "standalone": STANDALONE}
    write_project(project, pages, files={HELPER: "VALUE = 1\n"})
    first = mkdocs_build(project, project / "site")
    assert first.returncode == 0, first.stderr[-3000:]
    assert executed_pages(first) == ["standalone", "uses_helper"]
    assert "helper value 1" in page_html(project, "uses_helper")
    (project / "first-build.log").write_text(first.stderr)
    return project


@pytest.fixture
def project(built_project, tmp_path):
    """A copy of the built site, cache included, for one test to change."""
    return shutil.copytree(built_project, tmp_path / "project")


def test_a_clean_build_renders_each_notebook_before_mkdocs_asks(
    built_project,
):
    # mkdocs-jupyter then finds every page in its cache (sitebuild.prerender)
    lines = (built_project / "first-build.log").read_text().splitlines()
    hits = [index for index, line in enumerate(lines) if "Cache hit: " in line]
    written = [index for index, line in enumerate(lines) if "Cache miss" in line]
    assert len(hits) == 2, lines[-30:]  # MkDocs found both pages rendered
    assert len(written) <= 2 and all(index < min(hits) for index in written)


def test_a_clean_build_processes_notebook_html_before_mkdocs_asks(
    built_project,
):
    log = (built_project / "first-build.log").read_text()
    assert "processed 2 notebook pages ahead, here" in log, log[-3000:]
    assert "processed one by one" not in log


def test_rebuild_with_nothing_changed_executes_nothing(project):
    build = mkdocs_build(project, project / "site")
    assert build.returncode == 0, build.stderr[-3000:]
    assert executed_pages(build) == []


def test_editing_a_helper_a_page_imports_reexecutes_that_page_only(project):
    (project / HELPER).write_text("VALUE = 2\n")
    build = mkdocs_build(project, project / "site")
    assert build.returncode == 0, build.stderr[-3000:]
    assert executed_pages(build) == ["uses_helper"]
    assert "helper value 2" in page_html(project, "uses_helper")


def test_editing_one_page_reexecutes_that_page_only(project):
    page = project / "snippets" / "standalone.py"
    page.write_text(page.read_text().replace("version 1", "version 2"))
    build = mkdocs_build(project, project / "site")
    assert build.returncode == 0, build.stderr[-3000:]
    assert executed_pages(build) == ["standalone"]
    assert "standalone page, version 2" in page_html(project, "standalone")


def test_cache_key_covers_requirements_kernel_style_and_executor(tmp_path):
    for part in ["snippets", "sitebuild"]:
        shutil.copytree(ROOT / part, tmp_path / part)
    shutil.copy(ROOT / "requirements.txt", tmp_path)
    page = tmp_path / "snippets" / "kl_definition.py"
    before = execute.cache_key(page, tmp_path)
    (tmp_path / "requirements.txt").write_text("torch==9.9.9\n")
    assert execute.cache_key(page, tmp_path) != before


def test_processed_html_key_covers_requirements(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("latex2mathml==1.0\n")
    monkeypatch.setattr(postprocess, "REQUIREMENTS", requirements)
    before = postprocess._key("<p>$x$</p>", "page.py", {}, None)
    requirements.write_text("latex2mathml==2.0\n")
    assert postprocess._key("<p>$x$</p>", "page.py", {}, None) != before
