"""Claims of the page "What KL divergence is", checked on its own snippet."""

import math

import torch
from torch.testing import assert_close

from snippets import kl_definition as page

FLOAT32 = {"rtol": 1e-6, "atol": 1e-7}
FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}


def test_zero_probability_outcomes_contribute_nothing():
    # P = (½, ½, 0) against Q = (¼, ¼, ½): only the first two outcomes count
    expected = torch.tensor(2 * 0.5 * math.log(0.5 / 0.25))
    assert_close(page.kl_ignoring_zero, expected, **FLOAT32)


def test_q_zero_where_p_positive_gives_infinite_kl():
    assert page.kl_infinite.item() == math.inf


def test_naive_formula_returns_nan_when_p_has_a_zero():
    assert page.kl_naive.isnan()


def test_terms_can_be_negative_but_their_sum_cannot():
    assert (page.terms_pq < 0).any()
    assert page.kl_pq > 0
    assert_close(page.terms_pq.sum(), page.kl_pq, **FLOAT32)


def test_three_ways_agree_to_float32_precision():
    assert_close(page.kl_with_functional, page.kl_pq, **FLOAT32)
    assert_close(page.kl_with_distributions, page.kl_pq, **FLOAT32)


def test_kl_by_definition_matches_the_sum_formula():
    p, q = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert_close(page.kl_pq, torch.tensor(expected), **FLOAT32)


def test_kl_is_never_negative():
    assert page.kl_batch.shape == (page.n_pairs,)
    assert page.kl_batch.min() >= 0


def test_kl_is_zero_iff_distributions_equal():
    assert page.kl_pp.item() == 0.0  # exactly, not approximately
    assert page.kl_p_nearby > 0
    assert (page.kl_batch > 0).all()  # random pairs are never equal


def test_distinct_float32_distributions_can_round_to_a_non_positive_kl():
    assert not torch.equal(page.p_close, page.q_close)
    assert -1e-6 < page.kl_close <= 0


def test_definition_gradient_is_nan_where_p_and_q_are_both_zero():
    assert page.model_logits_far.softmax(dim=-1)[2] == 0  # Q underflowed
    assert page.kl_definition_loss.isfinite()
    assert page.grad_definition.isnan().all()


def test_kl_div_on_log_softmax_has_the_same_value_and_a_finite_gradient():
    assert_close(page.kl_functional_loss, page.kl_definition_loss, **FLOAT32)
    assert page.grad_functional.isfinite().all()


def test_kl_is_asymmetric():
    assert abs(page.kl_pq - page.kl_qp) > 1e-3


def test_kl_breaks_the_triangle_inequality():
    assert page.kl_ac > page.kl_ab_plus_kl_bc


def test_jensen_shannon_is_symmetric_and_its_root_obeys_the_triangle_inequality():
    generator = torch.Generator().manual_seed(1)
    a, b, c = torch.randn(3, 1000, 4, generator=generator).softmax(dim=-1)
    root_js = lambda x, y: page.js_divergence(x, y).sqrt()  # noqa: E731
    assert_close(page.js_divergence(a, c), page.js_divergence(c, a), **FLOAT32)
    assert (root_js(a, c) <= root_js(a, b) + root_js(b, c) + 1e-6).all()
    assert page.js_ac <= page.js_ab_plus_js_bc


def test_jensen_shannon_is_at_most_log_2_reached_by_disjoint_supports():
    generator = torch.Generator().manual_seed(2)
    p, q = (5 * torch.randn(2, 1000, 4, generator=generator)).softmax(dim=-1)
    assert (page.js_divergence(p, q) <= math.log(2) + 1e-6).all()
    disjoint_p, disjoint_q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert_close(page.js_divergence(disjoint_p, disjoint_q), torch.tensor(math.log(2)))


def test_cross_entropy_is_entropy_plus_kl():
    assert_close(page.cross_entropy_pq, page.entropy_p + page.kl_pq, **FLOAT32)


def test_cross_entropy_and_kl_have_the_same_gradient():
    assert_close(page.grad_cross_entropy, page.grad_kl, **FLOAT32)


def test_cross_entropy_and_kl_losses_differ_by_the_entropy():
    difference = page.cross_entropy_loss - page.kl_loss
    assert_close(difference.detach(), page.entropy_p, **FLOAT32)
    assert page.entropy_p > 0.5  # a visible gap, not rounding


def test_gaussian_kl_closed_form_library_and_integral_agree():
    assert_close(page.kl_normal, page.kl_closed_form, **FLOAT64)
    assert_close(page.kl_numerical, page.kl_closed_form, **FLOAT64)
