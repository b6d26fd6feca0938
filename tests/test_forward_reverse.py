"""Claims of the page "Forward vs reverse KL", checked with its own fitting code."""

import math

import imageio_ffmpeg
import pytest
import torch
from torch.testing import assert_close

from snippets import forward_reverse as page

SIGMA_STAR = math.sqrt(57.25)
ANIMATION_BUDGET = 150 * 1024


@pytest.fixture(scope="module")
def fits():
    return page.fit_gaussians(page.LOSSES, page.STARTS)


def end_points(fits, name):
    return fits[name][-1, :, :2]  # (mu, sigma) of each start


def test_target_integrates_to_one_on_the_grid():
    assert_close(page.grid_mass, torch.tensor(1.0, dtype=page.DTYPE), rtol=0, atol=1e-9)


def test_grid_moments_are_the_analytic_moments():
    assert_close(page.grid_mean.item(), 2.5, rtol=0, atol=1e-9)
    assert_close(page.grid_variance.item(), 57.25, rtol=0, atol=1e-7)
    assert_close(page.mu_star, 2.5)
    assert_close(page.sigma_star, SIGMA_STAR)


def test_grid_holds_the_mass_of_the_widest_fit(fits):
    widest = fits["cosine"][-1, :, 1].max()
    assert widest > 10
    mass = page.log_q_on_grid(torch.tensor(2.5), widest.log()).exp().sum()
    assert mass > 1 - 1e-6
    five_sigma = (2.5 - 5 * widest, 2.5 + 5 * widest)
    assert page.x.min() < five_sigma[0] and page.x.max() > five_sigma[1]


def test_forward_kl_fit_is_moment_matching_from_every_start(fits):
    for mu, sigma in end_points(fits, "forward KL"):
        assert_close(mu.item(), 2.5, rtol=0, atol=1e-2)
        assert_close(sigma.item(), SIGMA_STAR, rtol=0, atol=1e-2)


def test_forward_fit_widens_first_overshoots_then_settles(fits):
    mu, sigma = fits["forward KL"][:, 0, 0], fits["forward KL"][:, 0, 1]
    assert sigma[20] - sigma[0] > abs(mu[20] - mu[0])  # widening leads
    assert sigma.max() > SIGMA_STAR + 1  # overshoot
    assert (mu.diff() >= -1e-9).all()  # the mean only drifts right


def test_reverse_kl_fits_reach_the_peak_on_their_side_with_kl_log_2(fits):
    expected_peaks = [
        (-5.0, 1.0),
        (10.0, 1.0),
        (-5.0, 1.0),
    ]  # starts (-2,2) (6,2) (0,5)
    for (mu, sigma), (peak, width) in zip(
        end_points(fits, "reverse KL"), expected_peaks, strict=True
    ):
        assert_close((mu.item(), sigma.item()), (peak, width), rtol=0, atol=1e-2)
    assert_close(
        fits["reverse KL"][-1, :, 2],
        torch.full((3,), math.log(2), dtype=page.DTYPE),
        rtol=0,
        atol=1e-4,
    )


def test_reverse_kl_on_a_peak_is_just_under_log_2():
    # p > q/2 everywhere: the other peak's tail adds to p
    on_the_left_peak = page.log_q_on_grid(
        torch.tensor([[-5.0]], dtype=page.DTYPE), torch.zeros(1, 1, dtype=page.DTYPE)
    )
    gap = math.log(2) - page.reverse_kl(on_the_left_peak).item()
    assert 0 < gap < 1e-9


def test_sigma_stays_positive_at_every_step(fits):
    for trajectory in fits.values():
        assert (trajectory[:, :, 1] > 0).all()


def test_every_fit_converged(fits):
    for trajectory in fits.values():
        assert page.largest_recent_move(trajectory) < 1e-3
        losses = trajectory[:, :, 2]
        assert (losses[-100:] - losses[-1]).abs().max() < 1e-7


def test_mse_lands_between_the_peaks_wider_than_the_forward_fit(fits):
    ends = end_points(fits, "MSE")
    assert_close(ends[:, 0], torch.full((3,), 2.5, dtype=page.DTYPE), rtol=0, atol=1e-2)
    assert (ends[:, 1] > SIGMA_STAR + 1).all()
    assert ends[:, 1].max() - ends[:, 1].min() < 1e-2  # the same fit from every start


def test_mse_started_on_a_peak_stays_there_at_a_lower_loss_than_centred(fits):
    mse_only = {"MSE": page.density_mse}
    on_a_peak = page.fit_gaussians(mse_only, page.PEAK_STARTS, lr=page.PEAK_LR)["MSE"]
    assert page.largest_recent_move(on_a_peak) < 1e-3
    ends = zip(page.PEAK_STARTS, on_a_peak[-1], strict=True)
    for (peak, _), (mu, sigma, mse) in ends:
        assert abs(mu - peak) < 1e-2
        assert 1.0 < sigma < 3.0  # a little wider than the peak
        assert mse < fits["MSE"][-1, 0, 2]


def test_cosine_has_more_than_one_optimum(fits):
    (left_mu, left_sigma), *wide = end_points(fits, "cosine")
    assert_close((left_mu.item(), left_sigma.item()), (-5.0, 1.0), rtol=0, atol=1e-2)
    mse_sigma = end_points(fits, "MSE")[0, 1]
    for mu, sigma in wide:
        assert abs(mu - 2.5) < 1e-2
        assert sigma > mse_sigma


def test_reverse_kl_landscape_has_two_basins_split_near_the_middle():
    starts = [(2.0, 1.0), (3.0, 1.0)]
    ends = page.fit_gaussians({"reverse KL": page.reverse_kl}, starts)["reverse KL"]
    assert_close(
        ends[-1, :, 0], torch.tensor([-5.0, 10.0], dtype=page.DTYPE), rtol=0, atol=1e-2
    )


def test_forward_kl_landscape_has_its_minimum_at_moment_matching():
    mus = torch.linspace(0, 5, 51, dtype=page.DTYPE)
    sigmas = torch.linspace(6.5, 8.5, 41, dtype=page.DTYPE)
    landscape = page.loss_landscape(page.forward_kl, mus, sigmas)
    row, column = divmod(landscape.argmin().item(), len(mus))
    assert_close(
        (mus[column].item(), sigmas[row].item()), (2.5, SIGMA_STAR), rtol=0, atol=0.06
    )


def test_original_setup_stops_well_before_sigma_converges():
    sigmas, printed_loss, mu, sigma = page.original_setup_fit()
    assert sigmas[-1] < 0.75 * SIGMA_STAR
    steps_per_thousand = sigmas.diff()
    assert steps_per_thousand[-1] > 0.5 * steps_per_thousand[0]  # still climbing
    log_q = page.log_q_on_grid(mu.double(), sigma.double().log()).view(1, -1)
    true_kl = page.forward_kl(log_q).item()
    assert printed_loss < 0.1 * true_kl  # the printed number is not the KL


def test_original_setup_target_has_mass_two():
    p_sum = page.sum_of_densities(page.x.float())  # as the fit uses it
    assert_close((p_sum * page.dx).sum().item(), 2.0, rtol=1e-6, atol=0)
    assert_close(p_sum.sum().item(), 2.0 / page.dx, rtol=1e-6, atol=0)


def test_original_setup_prints_a_scaled_and_shifted_kl():
    _, printed_loss, mu, sigma = page.original_setup_fit(steps=200)
    log_q = page.log_q_on_grid(mu.double(), sigma.double().log()).view(1, -1)
    true_kl = page.forward_kl(log_q).item()
    n_points = len(page.x)
    expected = 2 * (true_kl + math.log(2)) / (n_points * page.dx)
    assert_close(printed_loss.item(), expected, rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def animation(tmp_path_factory):
    # a short fit is enough: the budget and frame count do not need convergence
    trajectory = page.fit_gaussians(
        {"reverse KL": page.reverse_kl}, page.STARTS[:2], steps=300
    )
    path = tmp_path_factory.mktemp("animation") / "fit.mp4"
    page.animate_fits(trajectory["reverse KL"], path, "reverse KL", n_frames=100)
    return path, trajectory["reverse KL"]


def test_animation_fits_the_size_budget_with_every_frame(animation):
    path, _ = animation
    assert path.stat().st_size <= ANIMATION_BUDGET
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    assert frames == 100
    assert seconds == pytest.approx(5.0)


def test_animation_is_the_same_bytes_every_time(animation, tmp_path):
    path, trajectory = animation
    again = page.animate_fits(trajectory, tmp_path / "again.mp4", "reverse KL")
    assert again.read_bytes() == path.read_bytes()


def test_animation_has_its_first_frame_as_poster(animation):
    path, _ = animation
    poster = path.with_suffix(".png")
    assert poster.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
