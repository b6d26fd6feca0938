# %% [markdown]
# # Forward vs reverse KL: fitting one Gaussian to two peaks
#
# Fit a single Gaussian $Q$ to a target $P$ with two well separated peaks and the
# direction of the KL decides what you get. The **forward** KL
# $D_{\mathrm{KL}}(P\,\|\,Q)$ is *mass-covering*: $Q$ stretches over both peaks and
# matches $P$'s mean and variance exactly. The **reverse** KL
# $D_{\mathrm{KL}}(Q\,\|\,P)$ is *mode-seeking*: $Q$ settles on one peak, which one
# depending on where it starts, at a divergence just under $\log 2$. Squared error and
# cosine similarity between the densities do something else again, measured below.
#
# On this page you will:
#
# - build the target as a proper mixture, on a grid wide enough for every fit;
# - fit $Q = \mathcal{N}(\mu, \sigma^2)$ with four losses, to convergence, and
#   watch the fits as animations made when this page was built;
# - check the fits against the analytic answers and see the loss landscapes;
# - see what went wrong in the blog set-up this experiment usually comes from.

# %% [markdown]
# ## The target: two peaks, total mass 1
#
# $P = \tfrac12\,\mathcal{N}(-5, 1) + \tfrac12\,\mathcal{N}(10, 1)$, a mixture:
# its density integrates to 1. On a grid of spacing $\Delta x$ each cell holds
# probability $p(x)\,\Delta x$, so the grid's log-probabilities are
# $\log p(x) + \log \Delta x$; `MixtureSameFamily.log_prob` computes $\log p(x)$
# with `logsumexp`, in log space. The grid spans $[-60, 65]$, more than five
# standard deviations of the widest $Q$ fitted below on each side.

# %%
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributions import Categorical, MixtureSameFamily, Normal

DTYPE = torch.float64
dx = 0.1
x = torch.arange(-60.0, 65.0 + dx / 2, dx, dtype=DTYPE)

target = MixtureSameFamily(
    Categorical(probs=torch.tensor([0.5, 0.5], dtype=DTYPE)),
    Normal(
        torch.tensor([-5.0, 10.0], dtype=DTYPE), torch.tensor([1.0, 1.0], dtype=DTYPE)
    ),
)
log_p = target.log_prob(x) + math.log(dx)  # log P of each grid cell
p = log_p.exp()

grid_mass = p.sum()
grid_mean = (p * x).sum()
grid_variance = (p * (x - grid_mean) ** 2).sum()

# %% active="ipynb"
# print(f"P on the grid: mass {grid_mass:.6f}, mean {grid_mean:.4f},"
#       f" variance {grid_variance:.4f}")

# %% [markdown]
# ## Q, its parameters, four losses
#
# $Q = \mathcal{N}(\mu, \sigma^2)$ with $\sigma = e^{s}$: the optimiser moves
# $(\mu, s)$, so $\sigma$ is positive by construction, whatever the step. Every fit
# below runs from several starting points, all at once, one row each. The losses
# compare $Q$ with $P$ on the grid:
#
# - forward KL $D_{\mathrm{KL}}(P\,\|\,Q)$: `F.kl_div(log_q, log_p, log_target=True)`,
#   the model first;
# - reverse KL $D_{\mathrm{KL}}(Q\,\|\,P)$: the same call with the arguments swapped;
# - the mean squared error between the two densities;
# - one minus the cosine similarity between the two densities.


# %%
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def log_q_on_grid(mu, log_sigma):
    """log Q of each grid cell, for Q = N(mu, exp(log_sigma)²); one row per fit."""
    # log N(x; mu, sigma²) = −½ ((x − mu) / sigma)² − log sigma − ½ log 2π
    log_density = -0.5 * ((x - mu) / log_sigma.exp()) ** 2 - log_sigma - LOG_SQRT_2PI
    return log_density + math.log(dx)


def forward_kl(log_q):  # KL(P‖Q)
    terms = F.kl_div(log_q, log_p.expand_as(log_q), reduction="none", log_target=True)
    return terms.sum(dim=-1)


def reverse_kl(log_q):  # KL(Q‖P): target and input swapped
    terms = F.kl_div(log_p.expand_as(log_q), log_q, reduction="none", log_target=True)
    return terms.sum(dim=-1)


def density_mse(log_q):  # mean over the grid of (q(x) − p(x))²
    return ((log_q.exp() - p) / dx).pow(2).mean(dim=-1)


def cosine_distance(log_q):  # 1 − cos(q, p), the densities seen as vectors
    return 1 - F.cosine_similarity(log_q.exp(), p.expand_as(log_q), dim=-1)


LOSSES = {
    "forward KL": forward_kl,
    "reverse KL": reverse_kl,
    "MSE": density_mse,
    "cosine": cosine_distance,
}
STARTS = [(-2.0, 2.0), (6.0, 2.0), (0.0, 5.0)]  # (mu, sigma) of each fit's start


def fit_gaussians(losses, starts, steps=1200, lr=0.1):
    """Adam on (mu, log sigma) from each (mu, sigma) in ``starts``, for each loss
    in ``losses`` (a dict of name: function), all fits at once.

    Returns {name: tensor of shape (steps + 1, len(starts), 3)}: mu, sigma and the
    loss of every fit at every step, the start included.
    """
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
# Every loss is minimised from the three starts in `STARTS`, all twelve fits in one
# loop: 1200 Adam steps at learning rate 0.1.

# %% active="ipynb"
# fits = fit_gaussians(LOSSES, STARTS)

# %% [markdown]
# ## Forward KL: moment matching
#
# Over Gaussians the forward KL has a closed-form minimiser. Only the cross term
# depends on $Q$:
#
# $$D_{\mathrm{KL}}(P\,\|\,Q) = -H(P) + \log \sigma + \tfrac12 \log 2\pi
#   + \frac{\mathbb{E}_P[(x - \mu)^2]}{2\sigma^2},$$
#
# and setting its derivatives to zero gives $\mu^* = \mathbb{E}_P[x]$ and
# $\sigma^{*2} = \mathrm{Var}_P[x]$: the fit matches $P$'s first two moments. For
# this mixture, $\mathbb{E}_P[x] = \tfrac12(-5) + \tfrac12 \cdot 10$ and
# $\mathrm{Var}_P[x] = \tfrac12(1 + 25) + \tfrac12(1 + 100) - \mathbb{E}_P[x]^2$.

# %%
mu_star = 0.5 * -5 + 0.5 * 10
sigma_star = math.sqrt(0.5 * (1 + 25) + 0.5 * (1 + 100) - mu_star**2)

# %% active="ipynb"
# print(f"moment matching: mu* = {mu_star}, sigma* = {sigma_star:.4f}")
# for (mu0, sigma0), (mu, sigma, kl) in zip(STARTS, fits["forward KL"][-1]):
#     print(f"from ({mu0:+.0f}, {sigma0:.0f}): mu = {mu:.4f}, sigma = {sigma:.4f},"
#           f" KL(P‖Q) = {kl:.4f}")

# %% [markdown]
# The animation shows the fit from the first start, $(\mu, \sigma) = (-2, 2)$:
# $Q$ first widens, overshooting $\sigma^*$, then drifts to the right and narrows
# until its mean sits between the peaks.


# %%
def animate_fits(trajectory, path, caption, n_frames=100, fps=20):
    """Write an MP4 of the fits in ``trajectory`` (steps + 1, fits, 3) over P,
    and its first frame as a PNG poster beside it."""
    # imported here so that importing this page draws nothing
    import imageio_ffmpeg
    import matplotlib.pyplot as plt
    import numpy as np

    steps = trajectory.shape[0] - 1
    # more frames early, where the fits move fast: step ∝ (frame index)²
    frame_steps = [round(steps * (i / (n_frames - 1)) ** 2) for i in range(n_frames)]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100, facecolor="white")
    grid = x.numpy()  # matplotlib draws NumPy arrays much faster than tensors
    ax.fill_between(grid, (p / dx).numpy(), color="0.8", label="P")
    lines = [ax.plot(grid, 0 * grid, lw=2, animated=True)[0] for _ in trajectory[0]]
    label = ax.text(0.99, 0.97, "", transform=ax.transAxes, ha="right", va="top")
    label.set_animated(True)
    ax.set(xlim=(-25, 30), ylim=(0, 0.45), xlabel="x", ylabel="density", title=caption)
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
    for index, step in enumerate(frame_steps):
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


def video_player(path):
    """A looping, muted HTML5 player for ``path``, with its first frame as poster;
    it loads nothing until it is on screen, where the site starts it."""
    from IPython.display import Video

    poster = Path(path).with_suffix(".png").name
    attributes = "controls loop muted playsinline preload=none data-play-when-visible"
    return Video(
        str(path), width=640, html_attributes=f'{attributes} poster="{poster}"'
    )


# %% active="ipynb"
# animate_fits(fits["forward KL"][:, :1], "forward_kl.mp4", "forward KL(P‖Q)")
# video_player("forward_kl.mp4")

# %% [markdown]
# ## Reverse KL: one peak, at log 2
#
# The reverse KL averages $\log \frac{q}{p}$ under $Q$, so it punishes $Q$ for any
# mass where $P$ has little, and does not care what $Q$ leaves out. Settled on one
# component, $q = \mathcal{N}(-5, 1)$ say, and with the peaks this far apart, $p$
# is $\tfrac12 q$ wherever $q$ has mass, plus a sliver of the other peak's tail,
# so the divergence is just under $\mathbb{E}_Q[\log \frac{q}{q/2}] = \log 2$.
# Which peak wins depends on the start: from $(-2, 2)$ and from $(0, 5)$ the left
# one, from $(6, 2)$ the right.

# %% active="ipynb"
# print(f"log 2 = {math.log(2):.6f}")
# for (mu0, sigma0), (mu, sigma, kl) in zip(STARTS, fits["reverse KL"][-1]):
#     print(f"from ({mu0:+.0f}, {sigma0:.0f}): mu = {mu:.4f}, sigma = {sigma:.4f},"
#           f" KL(Q‖P) = {kl:.6f}")

# %% active="ipynb"
# two_sides = fits["reverse KL"][:, :2]  # the starts (-2, 2) and (6, 2)
# animate_fits(two_sides, "reverse_kl.mp4", "reverse KL(Q‖P), two starts")
# video_player("reverse_kl.mp4")

# %% [markdown]
# ## What MSE and cosine similarity do
#
# Neither is a divergence between distributions; both compare the densities as
# curves. The table gives every fit's end point, measured; the animation follows
# the MSE and cosine fits from the start $(-2, 2)$.

# %% active="ipynb" tags=["hide-input"]
# from IPython.display import Markdown
#
# rows = [
#     f"| {name} | ({mu0:g}, {sigma0:g}) | {mu:.3f} | {sigma:.3f} | {value:.4g} |"
#     f" {largest_recent_move(fits[name][:, [i]]):.1e} |"
#     for name in LOSSES
#     for i, ((mu0, sigma0), (mu, sigma, value)) in enumerate(
#         zip(STARTS, fits[name][-1])
#     )
# ]
# Markdown(
#     "| loss | start (μ, σ) | final μ | final σ | final loss |"
#     " largest move, last 100 steps |\n|---|---|---|---|---|---|\n" + "\n".join(rows)
# )

# %% [markdown]
# From these three starts MSE lands on one Gaussian centred between the peaks,
# wider than the forward-KL fit. Cosine similarity has more than one optimum: from
# $(-2, 2)$ it settles on the left peak like the reverse KL, from the other two
# starts on a wide Gaussian centred between the peaks, wider still than MSE's.
#
# MSE has more than one optimum too, and the centred one is not its best: started
# on a peak, it stays there, a little wider than the peak, at a lower loss. This
# optimum is flat enough that Adam at learning rate 0.1 keeps jittering around it;
# half that settles.

# %%
PEAK_STARTS = [(-5.0, 2.0), (10.0, 2.0)]
PEAK_LR = 0.05

# %% active="ipynb"
# on_a_peak = fit_gaussians({"MSE": density_mse}, PEAK_STARTS, lr=PEAK_LR)["MSE"]
# print(f"centred fit: MSE = {fits['MSE'][-1, 0, 2]:.4e}")
# for i, ((mu0, sigma0), (mu, sigma, mse)) in enumerate(
#     zip(PEAK_STARTS, on_a_peak[-1])
# ):
#     move = largest_recent_move(on_a_peak[:, [i]])
#     print(f"from ({mu0:+.0f}, {sigma0:.0f}): mu = {mu:.3f}, sigma = {sigma:.3f},"
#           f" MSE = {mse:.4e}, last 100 steps moved {move:.0e}")

# %% active="ipynb"
# mse_and_cosine = torch.stack([fits["MSE"][:, 0], fits["cosine"][:, 0]], dim=1)
# animate_fits(mse_and_cosine, "mse_cosine.mp4", "MSE (blue) and cosine (orange)")
# video_player("mse_cosine.mp4")

# %% [markdown]
# ## Did every fit converge?
#
# A fit has converged when its loss stops falling and its parameters stop moving.
# The curves show each fit's loss minus its final value, on a log scale: every one
# falls to the floor of float64 rounding or flattens well before the last step,
# and the table above shows how far the parameters still moved in the last 100
# steps.

# %% active="ipynb" alt="Loss minus final loss against step for each fit"
# import matplotlib.pyplot as plt
#
# fig, axes = plt.subplots(1, 4, figsize=(7.2, 2.4), sharey=True)
# for ax, (name, trajectory) in zip(axes, fits.items()):
#     losses = trajectory[:, :, 2]
#     ax.semilogy((losses - losses[-1]).clamp_min(1e-16))
#     ax.set(title=name, xlabel="step")
# axes[0].set_ylabel("loss − final loss")
# plt.show()

# %% [markdown]
# ## The four fits side by side

# %% active="ipynb" alt="P and the fitted Q of each loss, from each start"
# fig, axes = plt.subplots(1, 4, figsize=(7.2, 2.4), sharey=True)
# for ax, (name, trajectory) in zip(axes, fits.items()):
#     ax.fill_between(x, p / dx, color="0.8")
#     for (mu0, sigma0), (mu, sigma, _) in zip(STARTS, trajectory[-1]):
#         density = Normal(mu, sigma).log_prob(x).exp()
#         ax.plot(x, density, label=f"from ({mu0:g}, {sigma0:g})")
#     ax.set(title=name, xlim=(-25, 30), xlabel="x")
# axes[0].legend(loc="upper right", fontsize=7)
# plt.show()

# %% [markdown]
# ## The landscapes behind it
#
# Both KL directions over a grid of $(\mu, \sigma)$, darker where lower, with the
# three fits' paths. The forward KL has a single basin at the moment-matching
# point; the reverse KL has two, one per peak, separated by a ridge near
# $\mu = 2.5$: a start's side of the ridge decides its peak.


# %%
def loss_landscape(loss, mus, sigmas):
    """The loss at every (mu, sigma) of a grid: shape (len(sigmas), len(mus))."""
    mu_grid, sigma_grid = torch.meshgrid(mus, sigmas, indexing="xy")
    log_q = log_q_on_grid(mu_grid.reshape(-1, 1), sigma_grid.log().reshape(-1, 1))
    return loss(log_q).reshape(mu_grid.shape)


# %% active="ipynb" alt="Forward and reverse KL over mu and sigma, with fit paths"
# mus = torch.linspace(-12, 17, 88, dtype=DTYPE)
# sigmas = torch.logspace(math.log10(0.5), math.log10(15), 60, dtype=DTYPE)
# fig, axes = plt.subplots(1, 2, figsize=(7.2, 2.8), sharey=True)
# for ax, name in zip(axes, ["forward KL", "reverse KL"]):
#     landscape = loss_landscape(LOSSES[name], mus, sigmas)
#     ax.contourf(mus, sigmas, landscape.log(), levels=30, cmap="viridis")
#     for i in range(len(STARTS)):
#         ax.plot(fits[name][:, i, 0], fits[name][:, i, 1], color="white", lw=1)
#         ax.plot(*fits[name][-1, i, :2], "o", color="white")
#     ax.set(title=f"log {name}", xlabel="μ", yscale="log")
# axes[0].set_ylabel("σ")
# plt.show()

# %% [markdown]
# ## Aside: the original set-up
#
# This experiment usually comes from a blog post whose set-up differs from the one
# above in four ways, each of which changes what it shows:
#
# - $P$ was the **sum** of the two densities, a function of total mass 2, not a
#   distribution;
# - **densities were used as probabilities**: on a grid, values of $p(x)$ with no
#   $\Delta x$, which sum to $2/\Delta x$ here;
# - `F.kl_div` ran with its **default `"mean"`** reduction, which divides by the
#   number $N$ of grid points; with the two choices above, the printed loss was
#   $2\,(D_{\mathrm{KL}} + \log 2) / (N \Delta x)$, not the KL;
# - **10,000 Adam steps at learning rate $10^{-3}$**, optimising $\sigma$ itself,
#   stop long before $\sigma$ has converged.
#
# The minimiser itself is unchanged (scaling $P$ does not move it), so the set-up
# looks right while printing wrong numbers and stopping short. Rerun here with
# those four choices, on this page's grid and from $(\mu, \sigma) = (0, 1)$:


# %%
def sum_of_densities(grid):
    """The blog's target: two densities added, total mass 2."""
    return (
        Normal(-5.0, 1.0).log_prob(grid).exp() + Normal(10.0, 1.0).log_prob(grid).exp()
    )


def original_setup_loss(mu, sigma, grid, target):
    """The blog's loss: log densities, no log Δx, and the default "mean"."""
    log_q_density = -0.5 * ((grid - mu) / sigma) ** 2 - sigma.log() - LOG_SQRT_2PI
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "mean" warns; that is the point here
        return F.kl_div(log_q_density, target, reduction="mean")


def original_setup_fit(steps=10_000, lr=1e-3):
    """The blog's four choices, in float32 like the post. Returns sigma after every
    1000 steps, the loss it prints at the end, and the final mu and sigma."""
    x32 = x.float()
    target = sum_of_densities(x32)
    mu = torch.tensor(0.0, requires_grad=True)
    sigma = torch.tensor(1.0, requires_grad=True)
    optimizer = torch.optim.Adam([mu, sigma], lr=lr)
    sigmas = []
    for step in range(steps):
        loss = original_setup_loss(mu, sigma, x32, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 1000 == 999:
            sigmas.append(sigma.item())
    with torch.no_grad():
        printed_loss = original_setup_loss(mu, sigma, x32, target)
    return torch.tensor(sigmas), printed_loss, mu.detach(), sigma.detach()


# %% active="ipynb"
# sigma_history, printed_loss, mu_end, sigma_end = original_setup_fit()
# p_blog = sum_of_densities(x)
# log_q_end = log_q_on_grid(mu_end.double(), sigma_end.double().log()).view(1, -1)
# true_kl = forward_kl(log_q_end)
# print(f"mass of P: {(p_blog * dx).sum():.4f}; as 'probabilities': {p_blog.sum():.1f}")
# print(f"printed loss after 10,000 steps: {printed_loss:.4f}")
# print(f"KL(P‖Q) of the Q it reached:      {true_kl.item():.4f}")
# print("sigma every 1000 steps:", [round(s, 2) for s in sigma_history.tolist()])
# print(f"sigma* = {sigma_star:.4f}")

# %% [markdown]
# After 10,000 steps $\sigma$ is still climbing by a similar amount every thousand
# steps, well short of $\sigma^*$, and the printed loss is a fraction of the true
# divergence of the $Q$ it reached.
#
# ## What to remember
#
# - Forward KL, $D_{\mathrm{KL}}(P\,\|\,Q)$ =
#   `F.kl_div(log_q, log_p, log_target=True)`, covers
#   every mode of $P$; over Gaussians it matches $P$'s mean and variance.
# - Reverse KL, $D_{\mathrm{KL}}(Q\,\|\,P)$, locks onto one mode; which one depends
#   on the start.
# - Distributions on a grid need $\Delta x$: probabilities are densities times the
#   spacing, and a mixture's weights make its mass 1.
# - Optimise $\log \sigma$, run to convergence, and check it: a flat loss curve and
#   parameters that stop moving.
