"""Claim markers and claim tests name each other, both ways (sitebuild/claims.py)."""

import ast
import shutil

import pytest
import yaml
from conftest import ROOT, mkdocs_build, read_mkdocs_yml, write_project

from sitebuild import claims, pages
from sitebuild.pages import snippet_pages

NOT_YET_MARKED = set()  # every page is marked


def test_every_marker_names_a_test_and_every_claim_test_is_named():
    assert claims.coverage_problems(ROOT, NOT_YET_MARKED) == []


@pytest.fixture
def copy(tmp_path):
    """The pages and their tests, on a temporary copy to break."""
    for part in ["snippets", "tests"]:
        shutil.copytree(ROOT / part, tmp_path / part)
    return tmp_path


def test_a_claim_test_no_marker_names_is_a_problem(copy):
    page = copy / "snippets" / "kl_properties.py"
    marker = "{✓ test_jensen_shannon_is_at_most_log_2_reached_by_disjoint_supports}"
    page.write_text(page.read_text().replace(marker, ""))
    problems = claims.coverage_problems(copy, NOT_YET_MARKED)
    assert len(problems) == 1
    assert (
        "test_jensen_shannon_is_at_most_log_2_reached_by_disjoint_supports is named "
        "by no marker" in problems[0]
    )


def test_a_marker_naming_no_test_is_a_problem(copy):
    page = copy / "snippets" / "kl_definition.py"
    marker = "{✓ test_kl_is_asymmetric}"
    page.write_text(page.read_text().replace(marker, "{✓ test_kl_is_symmetric}"))
    problems = claims.coverage_problems(copy, NOT_YET_MARKED)
    assert any("{✓ test_kl_is_symmetric} names no test" in p for p in problems)


def test_a_supporting_test_needs_no_marker(copy):
    page = copy / "snippets" / "kl_properties.py"
    marker = "{✓ test_jensen_shannon_is_at_most_log_2_reached_by_disjoint_supports}"
    page.write_text(page.read_text().replace(marker, ""))
    tests = copy / "tests" / "test_kl_properties.py"
    name = "test_jensen_shannon_is_at_most_log_2_reached_by_disjoint_supports"
    reason = f'\n    "{name}": "checks the set-up",'
    supporting = "SUPPORTING_TESTS = {"
    tests.write_text(tests.read_text().replace(supporting, supporting + reason))
    assert claims.coverage_problems(copy, NOT_YET_MARKED) == []


@pytest.mark.slow
def test_a_build_with_a_marker_naming_no_test_fails_naming_the_page(tmp_path):
    write_project(tmp_path, {"example_page": "print('runs')"})
    page = tmp_path / "snippets" / "example_page.py"
    page.write_text(
        "# %% [markdown]\n# # Example\n#\n# A claim. {✓ test_not_written}\n"
        "\n# %%\nprint('runs')\n"
    )
    build = mkdocs_build(tmp_path, tmp_path / "site")
    assert build.returncode != 0
    assert "example_page: the marker {✓ test_not_written} names no test" in (
        build.stderr
    )


def test_a_marker_becomes_a_button_opening_the_card_of_its_test():
    marked = (
        "<p>KL ≥ 0. {✓ test_kl_is_never_negative} Asymmetric."
        " {✓ test_swapping_the_arguments_changes_the_value} Never negative."
        " {✓ test_kl_is_never_negative}</p>"
    )
    html = claims.render(marked, "kl_properties")
    assert html.count('popovertarget="card-1" id="claim-1"') == 1
    assert html.count('popovertarget="card-2" id="claim-2"') == 1
    assert html.count('popovertarget="card-1" id="claim-1-2"') == 1
    assert html.count("<div popover id=") == 2  # one card per test
    assert '<div popover id="card-1"' in html
    assert "def test_kl_is_never_negative():" in html
    assert "{✓" not in html


def test_a_card_shows_tolerance_constants_and_the_sizes_and_dtypes():
    tests = claims.claim_tests("test_kl_definition")
    headline = tests["test_headline_call_is_the_mean_kl_per_row"]
    assert "vocab: [5, 32_000, 128_000]" in headline.runs_at
    assert "dtype: [torch.float32, torch.float64]" in headline.runs_at
    assert "atol=1e-6" in headline.tolerances
    properties = claims.claim_tests("test_kl_properties")
    gaussian = properties["test_gaussian_kl_closed_form_library_and_integral_agree"]
    assert any(t.startswith("FLOAT64 = {") for t in gaussian.tolerances)


def test_the_claims_page_counts_each_pages_claims_and_links_its_list():
    pages = claims.claims_pages(ROOT)
    overview = pages[claims.SITE_PATH]
    for source in snippet_pages():
        found = claims.page_markers(source)
        n_tests = len({(module, test) for module, test, _ in found})
        row = f"]({claims.list_path(source.stem)}) | {len(found)} | {n_tests} |"
        assert row in overview


def test_each_pages_list_gives_every_marker_its_sentence_and_a_link_to_it():
    pages = claims.claims_pages(ROOT)
    for source in snippet_pages():
        listing = pages[claims.list_path(source.stem)]
        for _, test, sentence in claims.page_markers(source):
            assert f"[`{test}`](../{source.stem}.py#claim-" in listing
            assert claims.listed_sentence(sentence, source.stem) in listing


def test_links_in_a_listed_sentence_point_where_they_did_on_the_page():
    sentence = (
        "See [below](#a-section), [half precision](half_precision.py#overflow),"
        " [the docs](https://pytorch.org/docs) and [home](../index.md)."
    )
    listed = claims.listed_sentence(sentence, "checked_kl")
    assert "[below](../checked_kl.py#a-section)" in listed
    assert "[half precision](../half_precision.py#overflow)" in listed
    assert "[the docs](https://pytorch.org/docs)" in listed
    assert "[home](../index.md)" in listed


def test_the_site_is_published_only_after_the_whole_suite_passed():
    # what the claims page says of the deployment workflow
    workflow = yaml.safe_load((ROOT / ".github/workflows/docs.yml").read_text())
    assert workflow["jobs"]["deploy"]["needs"] == "test"
    test_steps = [step.get("run", "") for step in workflow["jobs"]["test"]["steps"]]
    assert any(step.startswith("make test") for step in test_steps)


def listed(markdown: str) -> list[str]:
    """The sentence the claims list gives each marker of ``markdown``."""
    return [
        claims.sentence_before(markdown, match.start())
        for match in claims.MARKER.finditer(markdown)
    ]


def test_a_clause_marked_mid_sentence_is_listed_with_its_sentences_start():
    markdown = "Intro. The KL is finite {✓ test_a}, and never negative {✓ test_b}."
    assert listed(markdown) == [
        "The KL is finite",
        "The KL is finite, and never negative",
    ]


def test_a_marker_after_the_full_stop_closes_that_sentence():
    markdown = "Intro. The KL is finite. {✓ test_a}\n{✓ test_b} Next."
    assert listed(markdown) == ["The KL is finite.", "The KL is finite."]


def test_a_marker_on_its_own_line_ends_no_paragraph():
    markdown = "It reaches 65,520\n{✓ test_a}\n(65,520 equal logits, say)\n{✓ test_b}."
    assert listed(markdown)[1] == "It reaches 65,520 (65,520 equal logits, say)"


def test_abbreviations_end_no_sentence_but_list_items_and_paragraphs_do():
    markdown = (
        "Hinton et al. (§2) use a temperature, e.g. 2 {✓ test_a}.\n\n"
        "- sum, then divide {✓ test_b}\n- or not"
    )
    assert listed(markdown) == [
        "Hinton et al. (§2) use a temperature, e.g. 2",
        "sum, then divide",
    ]


def test_the_claims_page_lists_the_pages_in_reading_order():
    nav = read_mkdocs_yml(ROOT / "mkdocs.yml")["nav"]
    order = pages.nav_order(nav)
    in_nav = sorted(snippet_pages(), key=lambda path: order[path.name])
    titles = {path.stem: pages.title(path) for path in in_nav}
    overview = claims.claims_pages(ROOT, titles)[claims.SITE_PATH]
    listed = [overview.index(f"]({claims.list_path(stem)})") for stem in titles]
    assert listed == sorted(listed)
    assert in_nav[0].stem == "symptoms"  # the first page read


def test_source_segments_are_those_ast_gives_on_any_text():
    source = (
        'σ = {"rtol": 1e-6,\n      "atol": 0}  # ✓ wide characters\n'
        "def f(x=[1,\n        2]): return σ\n"
    )
    lines = source.encode().splitlines(keepends=True)
    for node in ast.walk(ast.parse(source)):
        if hasattr(node, "end_col_offset") and node.end_col_offset is not None:
            assert claims._segment(lines, node) == ast.get_source_segment(source, node)
