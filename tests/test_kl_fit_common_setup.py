"""Claims of the page "A common set-up for the two-peak fit", checked with its own
code, against the forward-vs-reverse page's set-up and by quadrature in float64."""

import functools
import math

import pytest
import torch
from torch.distributions import Normal
from torch.testing import assert_close

from snippets import forward_reverse
from snippets import kl_fit_common_setup as page

SIGMA_STAR = math.sqrt(57.25)  # Var_P = ½(1 + 25) + ½(1 + 100) − 2.5²
F64 = torch.float64


@functools.cache
def common_fit():
    return page.common_setup_fit()


def forward_kl_by_quadrature(mu, sigma):
    """KL(P‖Q) = ∫ p (log p − log q) dx by the trapezoid rule on a grid 200 times
    finer than the page's, in float64; no kl_div, no log Δx."""
    xs = torch.linspace(-80.0, 85.0, 330_001, dtype=F64)
    log_p = torch.logaddexp(
        Normal(-5.0, 1.0).log_prob(xs), Normal(10.0, 1.0).log_prob(xs)
    ) - math.log(2)
    log_q = Normal(
        torch.as_tensor(mu, dtype=F64), torch.as_tensor(sigma, dtype=F64)
    ).log_prob(xs)
    return torch.trapezoid(log_p.exp() * (log_p - log_q), xs)


def test_set_up_is_the_forward_reverse_pages():
    assert (page.X_MIN, page.X_MAX, page.dx) == (
        forward_reverse.X_MIN,
        forward_reverse.X_MAX,
        forward_reverse.dx,
    )
    assert_close(page.x, forward_reverse.x, rtol=0, atol=0)
    assert_close(page.log_p, forward_reverse.log_p, rtol=0, atol=0)
    # independently: P = ½ N(−5, 1) + ½ N(10, 1), each cell holding p(x) Δx
    log_density = torch.logaddexp(
        Normal(-5.0, 1.0).log_prob(page.x), Normal(10.0, 1.0).log_prob(page.x)
    ) - math.log(2)
    assert page.log_p.dtype == F64
    assert_close(page.log_p, log_density + math.log(page.dx), rtol=1e-12, atol=0)
    assert_close(page.sigma_star, forward_reverse.sigma_star, rtol=1e-12, atol=0)
    assert_close(page.sigma_star, SIGMA_STAR, rtol=1e-12, atol=0)


def test_forward_kl_is_the_forward_reverse_pages_and_matches_quadrature():
    mu, sigma = torch.tensor(1.0, dtype=F64), torch.tensor(3.0, dtype=F64)
    on_the_page = page.forward_kl(mu, sigma)
    log_q = forward_reverse.log_q_on_grid(mu, sigma.log()).view(1, -1)
    assert_close(on_the_page, forward_reverse.forward_kl(log_q)[0], rtol=1e-12, atol=0)
    assert_close(on_the_page, forward_kl_by_quadrature(mu, sigma), rtol=1e-6, atol=0)


def test_common_setup_stops_well_before_sigma_converges():
    sigmas, printed_loss, mu, sigma = common_fit()
    assert len(sigmas) == page.COMMON_STEPS // page.PRINT_EVERY
    assert sigmas[-1] < 0.75 * SIGMA_STAR
    steps_per_print = sigmas.diff()
    assert (steps_per_print > 0).all()  # climbing at every print
    assert steps_per_print[-1] > 0.9 * steps_per_print[0]  # about as fast as at first
    true_kl = page.forward_kl(mu, sigma).item()
    assert printed_loss < 0.1 * true_kl  # the printed number is not the KL
    assert_close(true_kl, forward_kl_by_quadrature(mu, sigma).item(), rtol=1e-6, atol=0)


def test_common_setup_target_has_mass_two():
    p_sum = page.sum_of_densities(page.x.float())  # as the fit uses it
    assert_close((p_sum * page.dx).sum().item(), 2.0, rtol=1e-6, atol=0)
    assert_close(p_sum.sum().item(), 2.0 / page.dx, rtol=1e-6, atol=0)


def test_default_mean_reduction_divides_the_sum_by_the_number_of_grid_points():
    mu, sigma = torch.tensor(1.0, dtype=F64), torch.tensor(3.0, dtype=F64)
    log_q = Normal(mu, sigma).log_prob(page.x) + math.log(page.dx)
    with pytest.warns(UserWarning, match="mean"):  # the default warns, and is "mean"
        mean = torch.nn.functional.kl_div(log_q, page.log_p, log_target=True)
    # independently: the definition, summed, over the number of grid points
    definition = (page.log_p.exp() * (page.log_p - log_q)).sum()
    assert_close(mean, definition / len(page.x), rtol=1e-12, atol=0)
    assert_close(mean * len(page.x), page.forward_kl(mu, sigma), rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps", [page.COMMON_STEPS, 200])  # the page's run, and one
def test_common_setup_prints_a_scaled_and_shifted_kl(steps):
    if steps == page.COMMON_STEPS:
        _, printed_loss, mu, sigma = common_fit()  # the run the page prints
    else:  # a second point, far from where the page's run stops
        _, printed_loss, mu, sigma = page.common_setup_fit(steps=steps)
    true_kl = forward_kl_by_quadrature(mu, sigma).item()  # float64, no kl_div
    n_points = len(page.x)
    expected = 2 * (true_kl + math.log(2)) / (n_points * page.dx)
    assert_close(printed_loss.item(), expected, rtol=1e-5, atol=0)


def test_common_setup_loss_has_the_same_minimiser_as_the_kl():
    # scaling P does not move the minimiser: in float64 the loss is stationary at
    # moment matching and higher a step away in each direction
    grid, target = page.x, page.sum_of_densities(page.x)
    mu = torch.tensor(2.5, dtype=F64, requires_grad=True)
    sigma = torch.tensor(SIGMA_STAR, dtype=F64, requires_grad=True)
    at_minimum = page.common_setup_loss(mu, sigma, grid, target)
    gradient = torch.autograd.grad(at_minimum, [mu, sigma])
    assert_close(torch.stack(gradient), torch.zeros(2, dtype=F64), rtol=0, atol=1e-9)
    for d_mu, d_sigma in [(0.5, 0.0), (-0.5, 0.0), (0.0, 0.5), (0.0, -0.5)]:
        moved = page.common_setup_loss(mu + d_mu, sigma + d_sigma, grid, target)
        assert moved > at_minimum
