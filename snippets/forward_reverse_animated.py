# %% [markdown]
# # Forward and reverse KL fits, step by step: animations and convergence
#
# How does one Gaussian $Q$ reach its fit of two peaks, and has it arrived? Under
# the forward KL, $Q$ first widens fast, overshooting the moment-matching width
# $\sigma^*$, while its mean drifts right
# {✓ test_forward_fit_widens_fast_overshoots_while_the_mean_drifts_right}, then
# narrows onto moment matching {✓ test_forward_reverse::
# test_forward_kl_fit_is_moment_matching_from_every_start}. Under the reverse KL,
# starts on either side of the middle end on the peak on their side
# {✓ test_forward_reverse::
# test_reverse_kl_fits_from_starts_reach_the_peak_on_their_side_with_kl_log_2}.
# By step `STEPS`, every fit has reached where a run of twice as many steps ends
# {✓ test_every_fit_is_at_the_long_runs_end_by_step_steps}.
#
# !!! tip "If you came here with…"
#     - a fit that keeps moving: [did every fit converge?](#did-every-fit-converge)
#     - which direction to use, and why: [Forward vs reverse KL](forward_reverse.py)

# %% [markdown]
# ## The set-up
#
# [Forward vs reverse KL](forward_reverse.py)'s experiment, copied to run on its
# own {✓ test_set_up_and_fits_are_the_forward_reverse_pages}: Adam on $(\mu, s)$,
# $\sigma = e^{s} > 0$ at every step {✓ test_sigma_stays_positive_at_every_step},
# a start without $\sigma > 0$ refused
# {✓ test_a_start_with_sigma_not_positive_is_refused}; fits of `LONG_STEPS` steps.

# %%
import math
from pathlib import Path

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
    log_density = -0.5 * ((x - mu) / log_sigma.exp()) ** 2 - log_sigma - LOG_SQRT_2PI
    return log_density + math.log(dx)


def forward_kl(log_q):  # KL(P‖Q) of each row
    terms = F.kl_div(log_q, log_p.expand_as(log_q), reduction="none", log_target=True)
    return terms.sum(dim=-1)


def reverse_kl(log_q):  # KL(Q‖P) of each row: target and input swapped
    terms = F.kl_div(log_p.expand_as(log_q), log_q, reduction="none", log_target=True)
    return terms.sum(dim=-1)


LOSSES = {"forward KL": forward_kl, "reverse KL": reverse_kl}
STARTS = [(-2.0, 2.0), (6.0, 2.0), (0.0, 5.0)]  # (mu, sigma) of each fit's start
STEPS, LR = 1200, 0.1
LONG_STEPS = 2 * STEPS


def fit_gaussians(losses, starts, steps=STEPS, lr=LR):
    """Adam on (mu, log sigma) from each (mu, sigma) start, for each loss, all at
    once. Returns {name: (steps + 1, len(starts), 3)}: mu, sigma, loss per step."""
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


# %% active="ipynb"
# long_fits = fit_gaussians(LOSSES, STARTS, steps=LONG_STEPS)
# fits = {name: trajectory[: STEPS + 1] for name, trajectory in long_fits.items()}
# print(f"{len(LOSSES) * len(STARTS)} fits, {STEPS} Adam steps at learning rate {LR}")

# %% [markdown]
# ## The two fits, animated
#
# The forward fit from $(-2, 2)$ widens fast past $\sigma^*$, its mean drifting right
# {✓ test_forward_fit_widens_fast_overshoots_while_the_mean_drifts_right}, then
# narrows onto moment matching between the peaks {✓ test_forward_reverse::
# test_forward_kl_fit_is_moment_matching_from_every_start}; the reverse fits from
# $(-2, 2)$ and $(6, 2)$ end on the peak on their side {✓ test_forward_reverse::
# test_reverse_kl_fits_from_starts_reach_the_peak_on_their_side_with_kl_log_2}.


# %%
def frame_steps(steps, n_frames):
    """Steps drawn: more frames early, where the fits move fast (step ∝ index²)."""
    return [round(steps * (i / (n_frames - 1)) ** 2) for i in range(n_frames)]


def density_top(trajectory, steps):
    """A y-limit above P and above every Q drawn: a Gaussian peaks at 1/(σ√2π)."""
    narrowest = trajectory[steps, :, 1].min().item()
    tallest = max((p / dx).max().item(), 1 / (narrowest * math.sqrt(2 * math.pi)))
    return 1.05 * tallest


def animate_fits(trajectory, path, caption, n_frames=100, fps=20):
    """An MP4 of the fits in ``trajectory`` over P, its first frame as PNG poster."""
    # imported here so that importing this page draws nothing
    import imageio_ffmpeg
    import matplotlib.pyplot as plt
    import numpy as np

    steps = frame_steps(trajectory.shape[0] - 1, n_frames)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100, facecolor="white")
    grid = x.numpy()  # matplotlib draws NumPy arrays much faster than tensors
    ax.fill_between(grid, (p / dx).numpy(), color="0.8", label="P")
    lines = [ax.plot(grid, 0 * grid, lw=2, animated=True)[0] for _ in trajectory[0]]
    label = ax.text(0.99, 0.97, "", transform=ax.transAxes, ha="right", va="top")
    label.set_animated(True)
    top = density_top(trajectory, steps)
    ax.set(xlim=(-25, 30), ylim=(0, top), xlabel="x", ylabel="density", title=caption)
    ax.legend(loc="upper left")
    fig.canvas.draw()  # draw the still parts once; each frame redraws only Q
    background = fig.canvas.copy_from_bbox(fig.bbox)
    writer = imageio_ffmpeg.write_frames(
        str(path),
        fig.canvas.get_width_height(),
        pix_fmt_in="rgba",
        fps=fps,
        macro_block_size=8,
        output_params=["-crf", "30", "-preset", "slow", "-threads", "1"]
        + ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1"]
        + ["-movflags", "+faststart"],  # same bytes every build; streams early
    )
    writer.send(None)
    for index, step in enumerate(steps):
        fig.canvas.restore_region(background)
        for line, (mu, sigma, _) in zip(lines, trajectory[step], strict=True):
            line.set_ydata(Normal(mu, sigma).log_prob(x).exp().numpy())
            ax.draw_artist(line)
        label.set_text(f"step {step}")
        ax.draw_artist(label)
        frame = fig.canvas.buffer_rgba()
        if index == 0:
            plt.imsave(Path(path).with_suffix(".png"), np.asarray(frame))
        writer.send(bytes(frame))
    writer.close()
    plt.close(fig)
    return path


def video_player(path, caption):
    """The animation at ``path``, looping, in a figure captioned ``caption``."""
    from html import escape

    from IPython.display import HTML

    name, label = Path(path).name, f"{Path(path).stem}-caption"
    return HTML(  # 640 by 360: animate_fits' frames
        f'<figure class="animation"><video src="{name}" width="640" height="360"'
        f' poster="{Path(name).with_suffix(".png")}" controls loop muted playsinline'
        f' preload="none" data-play-when-visible aria-describedby="{label}"></video>'
        f'<figcaption id="{label}">{escape(caption)}</figcaption></figure>'
    )


# %% active="ipynb"
# animate_fits(fits["forward KL"][:, :1], "forward_kl.mp4", "forward KL(P‖Q)")
# video_player("forward_kl.mp4", "Forward KL from (−2, 2): Q widens past σ*, its"
#              " mean drifting right, then narrows onto moment matching.")

# %% active="ipynb"
# two_sides = fits["reverse KL"][:, :2]  # the starts (-2, 2) and (6, 2)
# animate_fits(two_sides, "reverse_kl.mp4", "reverse KL(Q‖P), two starts")
# video_player("reverse_kl.mp4", "Reverse KL from (−2, 2) and from (6, 2): each fit"
#              " narrows onto the peak on its side of the middle, at −5 and at 10.")

# %% [markdown]
# ## Did every fit converge?
#
# The curves show each fit's distance, in $(\mu, \sigma)$, to where the same run
# ends after `LONG_STEPS` steps, on a log scale; the printed line gives the largest
# distance left at step `STEPS`: every fit has reached that end point by then, and
# each started far from it
# {✓ test_every_fit_is_at_the_long_runs_end_by_step_steps}. A common set-up of
# this experiment stops before $\sigma$ converges
# {✓ test_kl_fit_common_setup::test_common_setup_stops_well_before_sigma_converges}:
# see [A common set-up for the two-peak fit](kl_fit_common_setup.py).

# %% active="ipynb" alt="Distance to the long run's end point against step"
# import matplotlib.pyplot as plt
#
# fig, axes = plt.subplots(1, 2, figsize=(7.2, 2.4), sharey=True)
# for ax, (name, trajectory) in zip(axes, long_fits.items()):
#     distance = (trajectory[:, :, :2] - trajectory[-1, :, :2]).norm(dim=-1)
#     ax.semilogy(distance[: STEPS + 1].clamp_min(1e-16))
#     ax.set(title=name, xlabel="step")
#     print(f"{name}: largest distance at step {STEPS}: {distance[STEPS].max():.1e}")
# axes[0].set_ylabel("distance to the end")
# plt.show()

# %% [markdown]
# ## The fits side by side
#
# $P$ with the forward fit and the reverse fits on each peak; the last line prints
# how many standard deviations of the widest $Q$ on this page (overshoots
# included) the grid holds on each side: more than five
# {✓ test_grid_holds_more_than_five_sigma_of_the_widest_q_on_the_page}.

# %% active="ipynb" alt="P with the forward fit and the reverse fits on each peak"
# ends = {"forward KL": fits["forward KL"][-1, 0],
#         "reverse KL, left": fits["reverse KL"][-1, 0],
#         "reverse KL, right": fits["reverse KL"][-1, 1]}
# fig, ax = plt.subplots(figsize=(7.2, 2.8))
# ax.fill_between(x, p / dx, color="0.8", label="P")
# for name, (mu, sigma, _) in ends.items():
#     ax.plot(x, Normal(mu, sigma).log_prob(x).exp(), label=name)
# ax.set(xlim=(-25, 30), xlabel="x", ylabel="density")
# ax.legend(fontsize=7)
# plt.show()
# widest = max(t[:, :, 1].max() for t in long_fits.values())
# reach = min(mu_star - X_MIN, X_MAX - mu_star) / widest
# print(f"widest Q: sigma = {widest:.2f}; the grid holds {reach:.2f} of them each side")

# %% [markdown]
# ## What to remember
#
# - Optimise $\log \sigma$: $\sigma$ stays positive
#   {✓ test_sigma_stays_positive_at_every_step}. Run to convergence and check it,
#   by the distance to where a longer run ends
#   {✓ test_every_fit_is_at_the_long_runs_end_by_step_steps}.
