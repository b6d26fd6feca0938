# %% [markdown]
# # Is reverse KL always mode-seeking? Its three minima
#
# The reverse KL $D_{\mathrm{KL}}(Q\,\|\,P)$ is called *mode-seeking*: a single
# Gaussian $Q$ fitted with it to a target $P$ with two well separated peaks settles
# on one peak. Is that guaranteed? No. Its two global minima sit on the peaks,
# equal by symmetry {✓ test_reverse_kl_peaks_are_two_equal_global_minima}, and
# fits started narrow and to one side of the middle reach the peak on that side
# {✓ test_narrow_grid_starts_reach_the_peak_on_their_side_just_under_log_2}, but
# it has a third local minimum: a wide Gaussian centred between the peaks,
# covering both, at a divergence far above the peaks' $\log 2$
# {✓ test_covering_minimum_matches_quadrature_in_location_and_value}, where fits
# started wider near the middle stop
# {✓ test_reverse_kl_grid_starts_reach_the_minimum_the_table_names}. Which
# minimum a start reaches is a property of the optimiser too {✓
# test_wide_starts_reach_the_covering_minimum_with_adam_at_a_tenth_of_the_lr}:
# from wider starts still, Adam at this page's learning rate can rush past the
# covering minimum onto a peak, even the far one {✓
# test_wide_starts_narrow_below_the_ridge_and_those_carried_across_reach_far_peak}.
# "Mode-seeking" describes the global minima and narrow starts, not every fit. On
# this page you will fit the reverse KL from a grid of starts and see which minimum
# each reaches, check that the covering Gaussian is a true minimum, find the width
# at which the middle turns from a ridge into a valley, and see the landscapes of
# both KL directions.

# %% [markdown]
# ## The set-up, from the forward-vs-reverse page
#
# The experiment of [Forward vs reverse KL](forward_reverse.py), copied so that
# this page runs on its own: $P = \tfrac12\,\mathcal{N}(-5, 1) +
# \tfrac12\,\mathcal{N}(10, 1)$ on a grid of spacing $\Delta x$ (each cell holds
# probability $p(x)\,\Delta x$), $Q = \mathcal{N}(\mu, \sigma^2)$ with Adam moving
# $(\mu, \log\sigma)$, and both KL directions as `F.kl_div` with
# `reduction="none"`, summed over each row
# {✓ test_set_up_is_the_forward_reverse_pages}
# {✓ test_losses_and_fit_loop_are_the_forward_reverse_pages}. So $\sigma$ stays
# positive at every step {✓ test_sigma_stays_positive_at_every_step}, and a start
# without $\sigma > 0$ is refused
# {✓ test_a_start_with_sigma_not_positive_is_refused}. `mu_star` and `sigma_star`
# are $P$'s mean and standard deviation {✓ test_set_up_is_the_forward_reverse_pages}:
# the middle between the peaks, and the forward KL's minimiser
# {✓ test_forward_reverse::
# test_forward_kl_is_the_closed_form_whose_only_minimum_is_moment_matching}.

# %%
import math

import torch
import torch.nn.functional as F
from torch.distributions import Categorical, MixtureSameFamily, Normal

DTYPE = torch.float64
X_MIN, X_MAX, dx = -60.0, 65.0, 0.1
x = torch.arange(X_MIN, X_MAX + dx / 2, dx, dtype=DTYPE)
target = MixtureSameFamily(
    Categorical(probs=torch.tensor([0.5, 0.5], dtype=DTYPE)),
    Normal(
        torch.tensor([-5.0, 10.0], dtype=DTYPE), torch.tensor([1.0, 1.0], dtype=DTYPE)
    ),
)
log_p = target.log_prob(x) + math.log(dx)  # log P of each grid cell
p = log_p.exp()
mu_star, sigma_star = target.mean.item(), target.variance.sqrt().item()
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def log_q_on_grid(mu, log_sigma):
    """log Q of each grid cell, for Q = N(mu, exp(log_sigma)²); one row per fit."""
    # log N(x; mu, sigma²) = −½ ((x − mu) / sigma)² − log sigma − ½ log 2π
    log_density = -0.5 * ((x - mu) / log_sigma.exp()) ** 2 - log_sigma - LOG_SQRT_2PI
    return log_density + math.log(dx)


def forward_kl(log_q):  # KL(P‖Q) of each row
    terms = F.kl_div(log_q, log_p.expand_as(log_q), reduction="none", log_target=True)
    return terms.sum(dim=-1)


def reverse_kl(log_q):  # KL(Q‖P) of each row: target and input swapped
    terms = F.kl_div(log_p.expand_as(log_q), log_q, reduction="none", log_target=True)
    return terms.sum(dim=-1)


LOSSES = {"forward KL": forward_kl, "reverse KL": reverse_kl}
STEPS, LR = 1200, 0.1


def fit_gaussians(losses, starts, steps=STEPS, lr=LR):
    """Adam on (mu, log sigma) from each (mu, sigma) in ``starts``, for each loss
    in ``losses`` (a dict of name: function), all fits at once.

    Returns {name: tensor of shape (steps + 1, len(starts), 3)}: mu, sigma and the
    loss of every fit at every step, the start included.
    """
    if any(sigma <= 0 for _, sigma in starts):
        raise ValueError(f"every start needs sigma > 0, got {starts}")
    n_starts = len(starts)
    rows = torch.tensor(starts, dtype=DTYPE).repeat(len(losses), 1)  # one per fit
    mu = rows[:, :1].clone().requires_grad_()
    log_sigma = rows[:, 1:].log().requires_grad_()
    optimizer = torch.optim.Adam([mu, log_sigma], lr=lr)
    history = torch.empty(steps + 1, len(rows), 3, dtype=DTYPE)
    for step in range(steps + 1):
        log_q = log_q_on_grid(mu, log_sigma)
        rows_per_loss = zip(losses.values(), log_q.split(n_starts), strict=True)
        values = torch.cat([loss(rows) for loss, rows in rows_per_loss])
        history[step] = torch.cat([mu, log_sigma.exp(), values[:, None]], 1).detach()
        optimizer.zero_grad()
        values.sum().backward()  # fits are independent: each gets its own gradient
        optimizer.step()
    return dict(zip(losses, history.split(n_starts, dim=1), strict=True))


def largest_recent_move(trajectory, last_steps=100):
    """How far any fit's mu or sigma moved over its last ``last_steps`` steps."""
    recent = trajectory[-last_steps - 1 :, :, :2]
    return (recent - recent[-1]).abs().amax()


# %% [markdown]
# ## Reverse KL from a grid of starts
#
# The reverse KL is fitted from a grid of starts, narrow to wider than
# $\sigma^*$, for `STEPS` Adam steps at learning rate `LR`; the forward KL from the
# same starts too, for the landscapes further down. The table says which minimum
# each reverse fit reached; the line below it, how far any of them moved over its
# last 100 steps: every fit has stopped
# {✓ test_reverse_kl_grid_starts_reach_the_minimum_the_table_names}.

# %%
GRID_MUS = [-2.0, 1.0, 2.0, 3.0, 4.0, 6.0]
GRID_SIGMAS = [1.0, 4.0, 8.0]
GRID_STARTS = [(mu, sigma) for sigma in GRID_SIGMAS for mu in GRID_MUS]


def minimum_reached(mu, sigma):
    """Which of the reverse KL's three minima a fit ended at."""
    if sigma > 3:
        return "covers both"
    return "left peak" if mu < mu_star else "right peak"


# %% active="ipynb"
# grid_fits = fit_gaussians(LOSSES, GRID_STARTS)
# reverse_fits = grid_fits["reverse KL"]

# %% active="ipynb" tags=["hide-input"]
# from IPython.display import Markdown
#
# rows = [
#     f"| ({mu0:g}, {sigma0:g}) | {mu:.4f} | {sigma:.4f} | {kl:.4f} |"
#     f" {minimum_reached(mu, sigma)} |"
#     for (mu0, sigma0), (mu, sigma, kl) in zip(GRID_STARTS, reverse_fits[-1])
# ]
# Markdown(
#     "| start (μ, σ) | final μ | final σ | KL(Q‖P) | minimum reached |\n"
#     "|---|---|---|---|---|\n" + "\n".join(rows)
# )

# %% active="ipynb"
# print(f"largest move of a reverse fit, last 100 steps:"
#       f" {largest_recent_move(reverse_fits):.1e}")

# %% [markdown]
# Narrow starts go to the peak on their side of the middle, where the divergence
# is just under $\log 2$
# {✓ test_narrow_grid_starts_reach_the_peak_on_their_side_just_under_log_2}.
# Wider starts near the middle stop on the covering Gaussian instead
# {✓ test_reverse_kl_grid_starts_reach_the_minimum_the_table_names}, at a
# divergence many times larger
# {✓ test_covering_minimum_matches_quadrature_in_location_and_value}.
#
# ## Starts the grid leaves out: near the middle, and wider still
#
# Which minimum a start reaches is decided by the start, the loss surface and the
# optimiser together. `OTHER_STARTS` adds a start of $\sigma = 2$ just left of the
# middle, and four starts wider than any in the grid, fitted the same way (Adam,
# `STEPS` steps at learning rate `LR`).
# The first is fairly narrow, but $Q$ widens past the ridge between the peaks (see
# the next section) while $\mu$ is less than a third of the way to a peak {✓
# test_narrow_start_near_the_middle_widens_past_the_ridge_before_mu_nears_a_peak},
# and it stops on the covering Gaussian
# {✓ test_other_starts_reach_the_minima_the_page_names}. Adam's first
# `EARLY_STEPS` steps shrink $\sigma$ of all four wide starts from 12 to about 4.6
# (printed below), under the ridge's width (printed in the next section); for
# $(2, 12)$ and $(3, 12)$ they also carry $\mu$ across the middle, and these two
# fits run onto the far peak, on the other side of the middle from their start;
# $(1, 12)$ and $(4, 12)$ are still on their own side then, and widen again to stop
# on the covering Gaussian {✓
# test_wide_starts_narrow_below_the_ridge_and_those_carried_across_reach_far_peak}.
# Change the optimiser and the basins change: in the tests, Adam at a tenth of
# `LR`, run five times as long, takes all four wide starts to the covering minimum
# (not run here, to keep the page fast) {✓
# test_wide_starts_reach_the_covering_minimum_with_adam_at_a_tenth_of_the_lr}.

# %%
OTHER_STARTS = [(2.4, 2.0), (1.0, 12.0), (2.0, 12.0), (3.0, 12.0), (4.0, 12.0)]
EARLY_STEPS = 20  # where the wide starts are printed on their way

# %% active="ipynb"
# other_fits = fit_gaussians({"reverse KL": reverse_kl}, OTHER_STARTS)["reverse KL"]
# for (mu0, sigma0), (mu, sigma, kl), (mu_early, sigma_early, _) in zip(
#     OTHER_STARTS, other_fits[-1], other_fits[EARLY_STEPS]
# ):
#     print(f"from ({mu0:g}, {sigma0:g}): {minimum_reached(mu, sigma)},"
#           f" mu = {mu:.4f}, sigma = {sigma:.4f}, KL(Q‖P) = {kl:.4f};"
#           f" at step {EARLY_STEPS}: mu = {mu_early:.2f}, sigma = {sigma_early:.2f}")

# %% [markdown]
# ## The covering Gaussian is a true minimum
#
# It is not a saddle the fits crawl across: both eigenvalues of the Hessian of the
# reverse KL in $(\mu, \log\sigma)$ there are positive (printed below)
# {✓ test_covering_minimum_hessian_is_positive_definite}. Along
# $\mu$, the middle $\mu = 2.5$ is a ridge for narrow $Q$ and a valley floor for
# wide $Q$; the curvature changes sign at the $\sigma$ printed below
# {✓ test_middle_turns_from_ridge_to_valley_near_d_over_sqrt_2pi}. For
# equal-weight, unit-variance peaks a distance $d$ apart (here 15) it is close to
# $d/\sqrt{2\pi}$ once they are well separated, $d \gtrsim 4$
# {✓ test_well_separated_modes_turn_from_ridge_to_valley_near_d_over_sqrt_2pi},
# and smaller for closer peaks
# {✓ test_closer_modes_turn_from_ridge_to_valley_below_d_over_sqrt_2pi}; at
# $d \le 2$ the target has a single peak
# {✓ test_equal_mixture_of_unit_gaussians_has_one_peak_up_to_d_2}. Why: the
# curvature along $\mu$ at the middle is $1 - d^2\,\mathbb{E}_Q[r(1-r)]$, with $r$
# the left peak's share of $p(x)$, and $\mathbb{E}_Q[r(1-r)] \approx
# q(\mu)/d = 1/(d\,\sigma\sqrt{2\pi})$ when $Q$ is much wider than the $1/d$ over
# which $r$ switches {✓
# test_curvature_at_the_middle_is_one_minus_d_squared_expected_r_one_minus_r}.


# %%
def reverse_kl_hessian(mu, sigma):
    """Hessian of KL(Q‖P) in (mu, log sigma), by autograd."""

    def kl_at(theta):
        return reverse_kl(log_q_on_grid(theta[0].view(1, 1), theta[1].view(1, 1)))[0]

    theta = torch.tensor([mu, math.log(sigma)], dtype=DTYPE)
    return torch.autograd.functional.hessian(kl_at, theta)


def ridge_to_valley_sigma(low=2.0, high=12.0, iterations=40):
    """The sigma where d²KL(Q‖P)/dmu² at mu = mu* changes sign, by bisection."""
    for _ in range(iterations):
        middle = (low + high) / 2
        if reverse_kl_hessian(mu_star, middle)[0, 0] < 0:
            low = middle
        else:
            high = middle
    return (low + high) / 2


# %% active="ipynb"
# covering = reverse_fits[-1, GRID_STARTS.index((2.0, 4.0))]
# eigenvalues = torch.linalg.eigvalsh(reverse_kl_hessian(*covering[:2].tolist()))
# print(f"covering minimum: mu = {covering[0]:.4f}, sigma = {covering[1]:.4f},"
#       f" KL(Q‖P) = {covering[2]:.4f}")
# print("Hessian eigenvalues there:", [f"{v:.3g}" for v in eigenvalues.tolist()])
# print(f"mu = 2.5 turns from ridge to valley at sigma = {ridge_to_valley_sigma():.3f};"
#       f" d/√(2π) = {15 / math.sqrt(2 * math.pi):.3f}")

# %% [markdown]
# ## The landscapes behind it
#
# Both KL directions over a grid of $(\mu, \sigma)$, darker where lower, with the
# paths of the fits from the grid of starts; the white crosses mark the minima.
# The forward KL has a single basin, at the moment-matching point
# {✓ test_forward_kl_landscape_has_its_minimum_at_moment_matching}
# {✓ test_forward_reverse::
# test_forward_kl_is_the_closed_form_whose_only_minimum_is_moment_matching}, and
# every forward path heads there {✓ test_every_forward_path_heads_to_the_one_basin}.
# The reverse KL has three {✓ test_reverse_kl_landscape_has_exactly_three_minima}:
# one per peak {✓ test_reverse_kl_peaks_are_two_equal_global_minima}, and the
# covering one at $\mu = 2.5$ above the $\sigma$ where the ridge between the peaks
# turns into a valley
# {✓ test_reverse_kl_landscape_has_a_local_minimum_at_the_covering_gaussian}
# {✓ test_covering_minimum_hessian_is_positive_definite}.


# %%
def loss_landscape(loss, mus, sigmas):
    """The loss at every (mu, sigma) of a grid: shape (len(sigmas), len(mus))."""
    mu_grid, sigma_grid = torch.meshgrid(mus, sigmas, indexing="xy")
    log_q = log_q_on_grid(mu_grid.reshape(-1, 1), sigma_grid.log().reshape(-1, 1))
    return loss(log_q).reshape(mu_grid.shape)


# %% active="ipynb" alt="Forward and reverse KL over mu and sigma, with fit paths"
# import matplotlib.pyplot as plt
#
# mus = torch.linspace(-12, 17, 88, dtype=DTYPE)
# sigmas = torch.logspace(math.log10(0.5), math.log10(15), 60, dtype=DTYPE)
# minima = {
#     "forward KL": [(mu_star, sigma_star)],
#     "reverse KL": [(-5.0, 1.0), (10.0, 1.0), tuple(covering[:2].tolist())],
# }
# fig, axes = plt.subplots(1, 2, figsize=(7.2, 2.8), sharey=True)
# for ax, name in zip(axes, LOSSES):
#     landscape = loss_landscape(LOSSES[name], mus, sigmas)
#     ax.contourf(mus, sigmas, landscape.log(), levels=30, cmap="viridis")
#     for i in range(len(GRID_STARTS)):
#         ax.plot(grid_fits[name][:, i, 0], grid_fits[name][:, i, 1], color="white",
#                 lw=0.8)
#     ax.plot(*zip(*minima[name]), "x", color="white", ms=8, mew=2)
#     ax.set(title=f"log {name}", xlabel="μ", yscale="log")
# axes[0].set_ylabel("σ")
# plt.show()

# %% [markdown]
# ## The three minima over P
#
# $P$ with the reverse KL's three minima; the last line prints how many standard
# deviations of the widest $Q$ drawn on this page (starts and the forward fits'
# overshoots and the wide starts included) the grid holds on each side: more than
# five {✓ test_grid_holds_more_than_five_sigma_of_the_widest_q_on_the_page}.

# %% active="ipynb" alt="P with the three minima of the reverse KL"
# ends = {
#     "left peak": reverse_fits[-1, GRID_STARTS.index((-2.0, 1.0))],
#     "right peak": reverse_fits[-1, GRID_STARTS.index((6.0, 1.0))],
#     "covers both": covering,
# }
# fig, ax = plt.subplots(figsize=(7.2, 2.8))
# ax.fill_between(x, p / dx, color="0.8", label="P")
# for name, (mu, sigma, kl) in ends.items():
#     ax.plot(x, Normal(mu, sigma).log_prob(x).exp(), label=f"{name}, KL {kl:.3f}")
# ax.set(xlim=(-25, 30), xlabel="x", ylabel="density")
# ax.legend(fontsize=7)
# plt.show()
# widest = max(t[:, :, 1].max() for t in [*grid_fits.values(), other_fits])
# reach = min(mu_star - X_MIN, X_MAX - mu_star) / widest
# print(f"widest Q: sigma = {widest:.2f}; the grid holds {reach:.2f} of them each side")

# %% [markdown]
# ## What to remember
#
# - The reverse KL, $D_{\mathrm{KL}}(Q\,\|\,P)$, of one distribution on a grid is
#   `F.kl_div(log_p, log_q, reduction="sum", log_target=True)`, the target and
#   input of the forward KL swapped {✓
#   test_takeaway_reverse_kl_of_one_row_is_the_swapped_call_with_reduction_sum}.
# - Its global minima sit on the modes (here two, equal by symmetry)
#   {✓ test_reverse_kl_peaks_are_two_equal_global_minima}, and narrow
#   starts to one side of the middle reach the mode on that side
#   {✓ test_narrow_grid_starts_reach_the_peak_on_their_side_just_under_log_2}:
#   that is what "mode-seeking" describes.
# - It can have other local minima: here a wide Gaussian covering both modes
#   {✓ test_covering_minimum_matches_quadrature_in_location_and_value}, a
#   true minimum (positive-definite Hessian)
#   {✓ test_covering_minimum_hessian_is_positive_definite} that wider starts near
#   the middle reach {✓ test_reverse_kl_grid_starts_reach_the_minimum_the_table_names},
#   at a divergence far above the modes'
#   {✓ test_covering_minimum_matches_quadrature_in_location_and_value}.
#   "Mode-seeking" is not a guarantee, and which minimum a start reaches depends
#   on the optimiser and its learning rate too {✓
#   test_wide_starts_reach_the_covering_minimum_with_adam_at_a_tenth_of_the_lr}.
# - Between two well-separated (distance $d \gtrsim 4$), equal-weight,
#   unit-variance modes, the middle is a ridge for narrow $Q$ and a valley for $Q$
#   wider than about $d/\sqrt{2\pi}$
#   {✓ test_well_separated_modes_turn_from_ridge_to_valley_near_d_over_sqrt_2pi};
#   closer modes turn at a smaller width
#   {✓ test_closer_modes_turn_from_ridge_to_valley_below_d_over_sqrt_2pi}.
# - Fit from several starts, narrow and wide, and compare the divergences reached.
