# %% [markdown]
# # KL estimators in RL fine-tuning
#
# When a language model is fine-tuned with reinforcement learning, a KL term keeps
# the policy $q = \pi_\theta$ near a reference $p = \pi_{\text{ref}}$. The exact
# $D_{\mathrm{KL}}(q\,\|\,p)$ needs a sum over the whole vocabulary at every
# position; what the trainers use instead are one-sample estimates, from tokens
# $x \sim q$ and the ratio $r = p(x) / q(x)$ (John Schulman's
# [Approximating KL divergence]):
#
# $$k_1 = -\log r, \qquad k_2 = \tfrac12 (\log r)^2, \qquad
#   k_3 = (r - 1) - \log r.$$
#
# $k_1$ and $k_3$ are unbiased, $k_2$ is biased; $k_2$ and $k_3$ are never
# negative; $k_3$ has far less variance than $k_1$ when $q$ and $p$ are close, and
# unbounded variance when $p$'s tails are much heavier than $q$'s.
#
# On this page you will measure all of that on Gaussians, then compute the
# per-token terms of PPO-style RLHF ($k_1$ in the reward) and GRPO ($k_3$ in the
# loss) from log-probabilities, and see what the gradient of $k_3$ in a loss
# actually is.
#
# [Approximating KL divergence]: http://joschu.net/blog/kl-approx.html

# %% [markdown]
# ## Bias and spread, measured
#
# $q = \mathcal{N}(0, 1)$ is sampled; $p$ is $\mathcal{N}(0.1, 1)$ (near, true KL
# 0.005) or $\mathcal{N}(1, 1)$ (far, true KL 0.5). For each estimator, its mean
# over a million samples relative to the true KL (the bias), and its standard
# deviation relative to the true KL (the spread of a one-sample estimate).

# %%
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

SEED = 0
DTYPE = torch.float64
N_SAMPLES = 1_000_000


def estimators(log_p, log_q):
    """k1, k2, k3 for samples x ~ q, from log p(x) and log q(x)."""
    log_r = log_p - log_q  # r = p(x) / q(x)
    return {
        "k1": -log_r,
        "k2": 0.5 * log_r**2,
        "k3": torch.expm1(log_r) - log_r,  # (r − 1) − log r, accurate near r = 1
    }


def sampled_estimates(q, p, n_samples=N_SAMPLES, seed=SEED):
    """Each estimator on n samples of q, and the closed-form KL(q‖p)."""
    generator = torch.Generator().manual_seed(seed)
    x = q.loc + q.scale * torch.randn(n_samples, generator=generator, dtype=DTYPE)
    return estimators(p.log_prob(x), q.log_prob(x)), kl_divergence(q, p)


def gaussian(mu, sigma):
    return Normal(torch.tensor(mu, dtype=DTYPE), torch.tensor(sigma, dtype=DTYPE))


q = gaussian(0.0, 1.0)
PAIRS = {
    "near: p = N(0.1, 1)": gaussian(0.1, 1.0),
    "far: p = N(1, 1)": gaussian(1.0, 1.0),
}

# %% active="ipynb" tags=["hide-input"]
# from IPython.display import Markdown
#
# rows = []
# for pair, p in PAIRS.items():
#     samples, true_kl = sampled_estimates(q, p)
#     for name, values in samples.items():
#         bias, spread = values.mean() / true_kl - 1, values.std() / true_kl
#         rows.append(
#             f"| {pair} | {true_kl:.4f} | {name} | {bias:+.4f} | {spread:.2f} |"
#             f" {values.min():.3g} |"
#         )
# Markdown(
#     "| pair | true KL | estimator | bias / true KL | std / true KL | smallest |\n"
#     "|---|---|---|---|---|---|\n" + "\n".join(rows)
# )

# %% [markdown]
# Read the table as Schulman does: $k_1$'s bias and $k_3$'s are within a few
# standard errors of zero (the standard error of a million-sample mean is the
# spread divided by a thousand), while $k_2$ overestimates the far pair's KL by
# about a quarter. The "smallest" column shows a negative value for $k_1$ and
# none for $k_2$ or $k_3$: each sample of those two is $\ge 0$, $k_2$ being a
# square and $k_3$ because $r - 1 \ge \log r$. For the near pair $k_3$'s spread
# is a small fraction of $k_1$'s.

# %% [markdown]
# ## When k3's variance blows up
#
# $k_3$ contains $r = p/q$ itself, and
# $\mathbb{E}_q[r^2] = \int p^2 / q\,\mathrm{d}x$ is infinite when $p$'s tails
# are heavier than $\sqrt{q}$'s: sampling from a distribution much narrower than
# $p$. For two centred Gaussians that happens from $\sigma_p^2 \ge 2\sigma_q^2$
# on. With $q = \mathcal{N}(0, 1)$ and $p = \mathcal{N}(0, 2^2)$, past that
# threshold, the mean of $k_3$ is still the KL, but its sample standard deviation
# never settles as the sample grows, while $k_1$'s does.

# %%
p_wide = gaussian(0.0, 2.0)
GROWING_SIZES = [1_000, 10_000, 100_000, 1_000_000]


def spread_as_the_sample_grows(q, p):
    """Sample standard deviation of k1 and k3 on the first n samples, for each n."""
    samples, _ = sampled_estimates(q, p, max(GROWING_SIZES))
    return {
        name: [samples[name][:n].std().item() for n in GROWING_SIZES]
        for name in ["k1", "k3"]
    }


# %% active="ipynb"
# wide_samples, wide_kl = sampled_estimates(q, p_wide)
# print(f"true KL(q‖p) = {wide_kl:.4f}; means: k1 {wide_samples['k1'].mean():.4f},"
#       f" k3 {wide_samples['k3'].mean():.4f}")
# for name, stds in spread_as_the_sample_grows(q, p_wide).items():
#     print(f"std of {name} on 1e3, 1e4, 1e5, 1e6 samples:",
#           ", ".join(f"{std:.3f}" for std in stds))

# %% [markdown]
# ## Per token, in RLHF and GRPO
#
# In a language model, $q$ is the policy's next-token distribution and the
# sample is the token the policy generated; both log-probabilities of that token
# come from one forward pass each. PPO-style RLHF subtracts $\beta k_1$ per token
# from the reward (with the task reward added at the last token), so the KL enters
# through the policy gradient. GRPO instead adds $\beta k_3$ per token to the
# loss, with $r = \pi_{\text{ref}}(x) / \pi_\theta(x)$.

# %%
generator = torch.Generator().manual_seed(SEED)
batch_size, seq_len, vocab_size, beta = 2, 6, 50, 0.1
policy_logits = torch.randn(batch_size, seq_len, vocab_size, generator=generator)
reference_logits = policy_logits + 0.3 * torch.randn(
    batch_size, seq_len, vocab_size, generator=generator
)
policy_probs = policy_logits.softmax(dim=-1).view(-1, vocab_size)
tokens = torch.multinomial(policy_probs, 1, generator=generator)  # what it generated
tokens = tokens.view(batch_size, seq_len)

log_pi = policy_logits.log_softmax(dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
log_ref = reference_logits.log_softmax(dim=-1).gather(-1, tokens[..., None]).squeeze(-1)

# PPO-style RLHF: k1 = log π − log π_ref per token, subtracted from the reward
kl_penalty = beta * (log_pi - log_ref)
task_reward = torch.tensor([1.0, 0.0])  # one score per sequence
rewards = -kl_penalty
rewards[:, -1] += task_reward

# GRPO: k3 with r = π_ref / π, added per token to the loss
log_r = log_ref - log_pi
grpo_kl_term = beta * (torch.expm1(log_r) - log_r)

# %% active="ipynb"
# print("per-token k1 penalty (RLHF):\n", kl_penalty)
# print("per-token k3 term (GRPO):\n", grpo_kl_term)

# %% [markdown]
# ## The gradient of k3 in a loss is not the gradient of the KL
#
# Averaged over tokens sampled from $\pi_\theta$ and differentiated with the samples
# held fixed (which is what a loss does), $\nabla_\theta k_3 = (1 - r)\,\nabla_\theta
# \log \pi_\theta(x)$, whose expectation is
# $-\sum_x \pi_{\text{ref}}(x)\,\nabla_\theta \log \pi_\theta(x)
# = \nabla_\theta D_{\mathrm{KL}}(\pi_{\text{ref}}\,\|\,\pi_\theta)$: the gradient of
# the *forward* KL, not of the $D_{\mathrm{KL}}(\pi_\theta\,\|\,\pi_{\text{ref}})$
# that $k_3$ estimates. $k_1$ in a loss is worse: its expected gradient,
# $\mathbb{E}[\nabla_\theta \log \pi_\theta(x)]$, is zero. (This assumes
# on-policy tokens; when GRPO takes several steps on one batch, the tokens come
# from the previous policy and the expectation is over that.) Computed exactly over
# a small vocabulary (every token weighted by its probability, weights held
# fixed):


# %%
def expected_loss_gradient(estimator, logits, reference_log_probs):
    """E_{x ~ π}[∇ estimator(x)], the sampling distribution held fixed."""
    logits = logits.clone().requires_grad_()
    log_pi = logits.log_softmax(dim=-1)
    weights = log_pi.exp().detach()  # the tokens' probabilities, not differentiated
    values = estimators(reference_log_probs, log_pi)[estimator]
    (gradient,) = torch.autograd.grad((weights * values).sum(), logits)
    return gradient


def kl_gradient(logits, reference_log_probs, direction):
    """∇ of KL(π‖π_ref) ("reverse") or KL(π_ref‖π) ("forward") over the logits."""
    logits = logits.clone().requires_grad_()
    log_pi = logits.log_softmax(dim=-1)
    if direction == "reverse":  # KL(π‖π_ref): the one k3 estimates
        kl = F.kl_div(reference_log_probs, log_pi, reduction="sum", log_target=True)
    else:  # KL(π_ref‖π)
        kl = F.kl_div(log_pi, reference_log_probs, reduction="sum", log_target=True)
    (gradient,) = torch.autograd.grad(kl, logits)
    return gradient


small_logits = torch.randn(5, generator=generator, dtype=DTYPE)
small_reference = small_logits + torch.randn(5, generator=generator, dtype=DTYPE)
small_reference = small_reference.log_softmax(dim=-1)

grad_k3_loss = expected_loss_gradient("k3", small_logits, small_reference)
grad_k1_loss = expected_loss_gradient("k1", small_logits, small_reference)
grad_reverse_kl = kl_gradient(small_logits, small_reference, "reverse")
grad_forward_kl = kl_gradient(small_logits, small_reference, "forward")

# %% active="ipynb"
# print("E[∇ k3]          ", grad_k3_loss)
# print("∇ KL(π_ref‖π)    ", grad_forward_kl)
# print("∇ KL(π‖π_ref)    ", grad_reverse_kl)
# print("E[∇ k1]          ", grad_k1_loss)

# %% [markdown]
# ## What to remember
#
# - From samples of $q$ and $r = p/q$: $k_1 = -\log r$ is unbiased, can be
#   negative, and is noisy when $q \approx p$; $k_2 = \tfrac12(\log r)^2$ is
#   biased; $k_3 = (r - 1) - \log r$ is unbiased, never negative, quiet when
#   $q \approx p$, and of unbounded variance when $p$'s tails are much heavier
#   than $q$'s (centred Gaussians: $\sigma_p^2 \ge 2\sigma_q^2$).
# - RLHF puts $\beta k_1$ in the reward; GRPO puts $\beta k_3$ in the loss.
# - In a loss, $k_3$'s gradient is that of the forward KL
#   $D_{\mathrm{KL}}(\pi_{\text{ref}}\,\|\,\pi_\theta)$ in expectation, and $k_1$'s is
#   zero: an estimator of a value is not an estimator of its gradient.
