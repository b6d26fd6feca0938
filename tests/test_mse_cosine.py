"""Claims of the page "Squared error and cosine similarity", checked with its own
fitting code and against closed forms."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torch.testing import assert_close

from snippets import mse_cosine as page

SIGMA_STAR = math.sqrt(57.25)  # the forward-KL fit's width
F64 = torch.float64


@pytest.fixture(scope="module")
def fits():
    return page.fit_gaussians(page.LOSSES, page.STARTS)


@pytest.fixture(scope="module")
def on_a_peak():
    mse_only = {"MSE": page.density_mse}
    return page.fit_gaussians(mse_only, page.PEAK_STARTS, lr=page.PEAK_LR)["MSE"]


def end_points(fits, name):
    return fits[name][-1, :, :2]


def l2_squared(mu_a, sigma_a, mu_b, sigma_b):
    """∫ (N(mu_a, σ_a²) − N(mu_b, σ_b²))² dx in closed form: ∫ N_i N_j dx is the
    density of N(0, σ_i² + σ_j²) at mu_i − mu_j."""

    def overlap(mu_i, s_i, mu_j, s_j):
        variance = s_i**2 + s_j**2
        return math.exp(-((mu_i - mu_j) ** 2) / (2 * variance)) / math.sqrt(
            2 * math.pi * variance
        )

    return (
        overlap(mu_a, sigma_a, mu_a, sigma_a)
        + overlap(mu_b, sigma_b, mu_b, sigma_b)
        - 2 * overlap(mu_a, sigma_a, mu_b, sigma_b)
    )


def test_mse_on_the_grid_is_the_squared_l2_distance_over_the_grid_length():
    q_params, p_params = (0.0, 2.0), (1.0, 3.0)
    log_q = page.log_q_on_grid(
        torch.tensor(0.0, dtype=F64), torch.tensor(2.0, dtype=F64).log()
    )
    q = log_q.exp() / page.dx
    p = Normal(*p_params).log_prob(page.x).exp()
    riemann = ((q - p) ** 2).sum() * page.dx
    assert_close(riemann.item(), l2_squared(*q_params, *p_params), rtol=1e-6, atol=0)


def test_stretching_x_changes_squared_l2_and_leaves_kl_unchanged():
    stretch = 3.0
    plain = l2_squared(0.0, 1.0, 1.0, 2.0)
    stretched = l2_squared(0.0, stretch, stretch, 2 * stretch)
    assert_close(stretched, plain / stretch, rtol=1e-12, atol=0)  # ∫ scales by 1/c
    kl = kl_divergence(Normal(0.0, 1.0), Normal(1.0, 2.0))
    kl_stretched = kl_divergence(Normal(0.0, stretch), Normal(stretch, 2 * stretch))
    assert_close(kl_stretched, kl, rtol=1e-6, atol=0)


def test_cosine_distance_is_zero_only_when_q_is_p():
    assert page.cosine_distance(page.p.log().view(1, -1)).abs().item() < 1e-12
    other = page.log_q_on_grid(
        torch.tensor([[2.5]], dtype=F64), torch.zeros(1, 1, dtype=F64)
    )
    assert page.cosine_distance(other).item() > 0.1


def test_mse_lands_between_the_peaks_wider_than_the_forward_fit(fits):
    ends = end_points(fits, "MSE")
    assert_close(ends[:, 0], torch.full((3,), 2.5, dtype=F64), rtol=0, atol=1e-3)
    assert (ends[:, 1] > SIGMA_STAR + 1).all()
    assert ends[:, 1].max() - ends[:, 1].min() < 1e-3  # the same fit from every start


def test_cosine_settles_on_the_left_peak_from_minus_2_and_wide_otherwise(fits):
    (left_mu, left_sigma), *wide = end_points(fits, "cosine")
    assert_close((left_mu.item(), left_sigma.item()), (-5.0, 1.0), rtol=0, atol=1e-4)
    mse_sigma = end_points(fits, "MSE")[0, 1]
    for mu, sigma in wide:
        assert abs(mu - 2.5) < 1e-3
        assert sigma > mse_sigma


def test_cosine_on_a_peak_keeps_its_width_and_has_similarity_one_over_root_2(fits):
    mu, sigma, distance = fits["cosine"][-1, 0]
    assert_close(sigma.item(), 1.0, rtol=0, atol=1e-4)
    assert_close(distance.item(), 1 - 1 / math.sqrt(2), rtol=0, atol=1e-9)


def test_mse_started_on_a_peak_stays_there_at_a_lower_loss_than_centred(
    fits, on_a_peak
):
    for (peak, _), (mu, _, mse) in zip(page.PEAK_STARTS, on_a_peak[-1], strict=True):
        assert abs(mu - peak) < 1e-6
        assert mse < fits["MSE"][-1, 0, 2]


def test_mse_width_on_a_peak_is_the_closed_form(on_a_peak):
    sigma_squared = 2 ** (-1 / 3) / (1 - 2 ** (-1 / 3))
    assert_close(page.PEAK_SIGMA, math.sqrt(sigma_squared), rtol=1e-15, atol=0)

    # the closed form minimises the one-peak objective (checked on both sides)
    def objective(sigma):
        return 1 / (2 * sigma * math.sqrt(math.pi)) - 1 / math.sqrt(
            2 * math.pi * (1 + sigma**2)
        )

    assert objective(page.PEAK_SIGMA) < min(
        objective(page.PEAK_SIGMA - 1e-3), objective(page.PEAK_SIGMA + 1e-3)
    )
    for sigma in on_a_peak[-1, :, 1]:
        assert_close(sigma.item(), page.PEAK_SIGMA, rtol=0, atol=1e-4)
    assert 1.9 < page.PEAK_SIGMA < 2.0  # "about twice the peak's width"


def test_mse_on_a_peak_keeps_moving_at_lr_and_settles_at_peak_lr(on_a_peak):
    at_lr = page.fit_gaussians({"MSE": page.density_mse}, page.PEAK_STARTS)["MSE"]
    assert page.largest_recent_move(at_lr) > 1e-3
    assert page.largest_recent_move(on_a_peak) < 1e-9
    assert page.PEAK_LR == page.LR / 2


def test_every_fit_from_the_starts_converged(fits):
    for trajectory in fits.values():
        assert page.largest_recent_move(trajectory) < 1e-3


def test_grid_holds_the_mass_of_the_widest_q_on_the_way(fits):
    widest = max(t[:, :, 1].max() for t in fits.values())
    held = page.log_q_on_grid(torch.tensor(2.5, dtype=F64), widest.log()).exp().sum()
    assert held > 1 - 1e-4


def test_a_start_with_sigma_not_positive_is_refused():
    with pytest.raises(ValueError, match="sigma > 0"):
        page.fit_gaussians(page.LOSSES, [(0.0, -1.0)])
