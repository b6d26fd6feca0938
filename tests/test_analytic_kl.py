"""Claims of the page "Analytic KL with torch.distributions"."""

import inspect
import math

import pytest
import torch
from torch.distributions import MixtureSameFamily, Normal, kl_divergence
from torch.testing import assert_close

from snippets import analytic_kl as page
from snippets import forward_reverse

FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}


def test_normal_closed_form_matches_the_formula_for_every_pair_of_the_batch():
    assert page.normal_library.shape == (3,)
    assert_close(page.normal_library, page.normal_formula, **FLOAT64)


def test_categorical_closed_form_matches_the_definition():
    assert_close(page.categorical_library, page.categorical_formula, **FLOAT64)


def test_multivariate_normal_closed_form_matches_the_formula():
    assert_close(page.mvn_library, page.mvn_formula, rtol=1e-9, atol=1e-10)


def test_kl_divergence_takes_p_first():
    forward = kl_divergence(Normal(0.0, 1.0), Normal(1.0, 2.0))
    reverse = kl_divergence(Normal(1.0, 2.0), Normal(0.0, 1.0))
    # KL(N(0, 1)‖N(1, 2²)) = log 2 + (1 + 1) / (2 · 4) − ½
    assert_close(forward.item(), math.log(2) + 2 / 8 - 0.5)
    assert abs(forward - reverse) > 0.1


def test_unregistered_pair_raises_not_implemented():
    message = page.kl_or_error(page.mixture, page.moment_matched)
    assert message.startswith("NotImplementedError: No KL(p || q) is implemented")


def test_registered_subclass_pair_is_used_and_the_plain_class_is_unaffected():
    assert isinstance(page.kl_mixture_normal, torch.Tensor)
    assert isinstance(page.kl_or_error(page.mixture, page.moment_matched), str)
    assert type(page.mixture) is MixtureSameFamily


def test_registered_mixture_kl_matches_the_other_page_at_the_forward_optimum():
    log_sigma = torch.tensor(57.25, dtype=torch.float64).sqrt().log()
    log_q = forward_reverse.log_q_on_grid(torch.tensor(2.5), log_sigma).view(1, -1)
    fitted = forward_reverse.forward_kl(log_q)[0]
    assert_close(page.kl_mixture_normal, fitted, rtol=1e-6, atol=0)


def test_support_mismatch_gives_infinity_and_the_nested_direction_log_2():
    assert page.kl_wide_narrow.item() == math.inf
    assert_close(page.kl_narrow_wide.item(), math.log(2))


def test_rsample_takes_no_generator():
    assert "generator" not in inspect.signature(Normal.rsample).parameters


def test_monte_carlo_is_unbiased():
    torch.manual_seed(1)
    estimates = torch.stack(
        [page.monte_carlo_kl(page.p_normal, page.q_normal, 1000) for _ in range(200)]
    )
    standard_error = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - page.kl_exact) < 4 * standard_error


def test_monte_carlo_error_falls_as_one_over_root_n():
    errors = page.monte_carlo_errors()
    scaled = errors * torch.tensor(page.SAMPLE_SIZES, dtype=errors.dtype).sqrt()
    assert (errors.diff() < 0).all()
    assert scaled.max() / scaled.min() < 1.5  # error × √n stays about constant


def test_monte_carlo_gradient_matches_the_closed_form_gradient():
    exact, estimated = page.gradients_of_mean()
    assert_close(estimated, exact, rtol=0, atol=0.01)


def test_vae_closed_form_matches_kl_divergence():
    assert_close(page.vae_kl_formula, page.vae_kl_library, **FLOAT64)


def test_mixture_has_no_rsample_but_sample_gives_an_unbiased_estimate():
    assert not page.mixture.has_rsample
    with pytest.raises(NotImplementedError):
        page.monte_carlo_kl(page.mixture, page.moment_matched, 10)
    torch.manual_seed(0)
    x = page.mixture.sample((200_000,))
    estimate = (page.mixture.log_prob(x) - page.moment_matched.log_prob(x)).mean()
    assert_close(estimate, page.kl_mixture_normal, rtol=0.02, atol=0)
