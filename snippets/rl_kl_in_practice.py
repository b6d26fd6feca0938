# %% [markdown]
# # KL penalties in RL fine-tuning, in practice
#
# What goes in the loss so that its gradient is that of
# $D_{\mathrm{KL}}(\pi_\theta\,\|\,\pi_{\text{ref}})$? Any of three things: $k_2$
# as a loss term; $k_1$ as a *detached* reward (a coefficient of
# $\log \pi_\theta$); or $k_3$ multiplied by the differentiable ratio
# $\pi_\theta / \mathrm{sg}(\pi_{\text{old}})$ (DeepSeek-V3.2, §3.1)
# {✓ test_reverse_kl_gradient_recipes_hold_at_real_vocabularies}. $k_3$ alone
# in the loss, as GRPO writes it, has the gradient of the *forward* KL
# {✓ test_k3_in_the_loss_has_the_forward_kl_gradient}, and $k_1$ alone in the
# loss a zero expected gradient {✓ test_k1_in_the_loss_has_zero_expected_gradient}:
# estimating a value is not estimating its gradient ([estimators](rl_estimators.py)).
#
# !!! tip "If you came here with…"
#     - a config key (`kl_estimator`, `use_kl_loss`, `low_var_kl`, `beta`) or a β
#       that depends on length: [KL in TRL and verl](rl_kl_in_trl_and_verl.py)
#     - a negative KL metric, or an adaptive β: [negative KL in
#       RL](rl_negative_kl.py), [the adaptive KL controller](rl_adaptive_kl.py)
#
# On this page you will compute per-token terms and rewards of a padded batch, and
# check each choice of loss term against the exact gradient, per token and sequence.

# %% [markdown]
# ## Per token, in a padded batch
#
# The KL between sequence distributions splits by the chain rule into per-position
# KLs {✓ test_sequence_kl_is_the_expected_sum_of_per_position_kls}:
#
# $$D_{\mathrm{KL}}(\pi_\theta\,\|\,\pi_{\text{ref}})_{\text{seq}} =
# \mathbb{E}_{y \sim \pi_\theta}\big[\sum_t D_{\mathrm{KL}}\big(\pi_\theta(\cdot
# \mid y_{<t})\,\|\,\pi_{\text{ref}}(\cdot \mid y_{<t})\big)\big].$$
#
# Each per-position KL is exact from the two logits tables
# {✓ test_full_kl_with_kl_div_matches_float64_definition_at_real_sizes}, what
# verl's `"full"` names but does not implement (it raises `NotImplementedError`,
# `core_algos.py` lines 2246-2248 at `1dda039`, not run here). Take `log_softmax`
# in float32: from bfloat16 logits, a bfloat16 one puts a KL near 0.1 off by over
# a tenth in some rows, and one near 0.001 by more than itself {✓
# test_bfloat16_log_softmax_puts_the_per_position_kl_far_off}. $k_1$ and $k_3$ of
# the sampled token are one-sample estimates whose expectation under $\pi_\theta$
# is that KL {✓ test_full_per_position_kl_is_the_policy_expectation_of_k1_and_of_k3}.
# The PPO-style reward below subtracts $\beta k_1$ per token and adds the task score
# at each sequence's *last real token*
# {✓ test_task_score_lands_on_the_last_real_token_and_padding_gets_nothing} (TRL's
# PPO uses [the slot after it](rl_kl_in_trl_and_verl.py#the-names-in-trl-and-verl)),
# without a graph {✓ test_rewards_carry_no_graph_although_the_policy_log_probs_do}.
# GRPO adds $\beta k_3$ per token to the loss
# {✓ test_grpo_term_is_beta_k3_on_real_tokens_and_never_negative}.

# %%
import torch
import torch.nn.functional as F

SEED = 0
generator = torch.Generator().manual_seed(SEED)
batch_size, seq_len, vocab_size, beta = 2, 6, 50, 0.1
shape = (batch_size, seq_len, vocab_size)
policy_logits = torch.randn(shape, generator=generator).requires_grad_()  # live
noise = 0.3 * torch.randn(shape, generator=generator)
reference_logits = policy_logits.detach() + noise
lengths = torch.tensor([6, 4])  # the second sequence ends early: 2 padding tokens
mask = torch.arange(seq_len) < lengths[:, None]
policy_probs = policy_logits.detach().softmax(dim=-1).view(-1, vocab_size)
tokens = torch.multinomial(policy_probs, 1, generator=generator).view(mask.shape)
log_probs = policy_logits.float().log_softmax(dim=-1)  # float32, whatever the logits
reference_log_probs = reference_logits.float().log_softmax(dim=-1)
log_pi = log_probs.gather(-1, tokens[..., None]).squeeze(-1)
log_ref = reference_log_probs.gather(-1, tokens[..., None]).squeeze(-1)

full_kl = F.kl_div(reference_log_probs, log_probs, reduction="none", log_target=True)
full_kl = full_kl.sum(dim=-1) * mask  # the exact KL at each position; padding: 0

task_reward = torch.tensor([1.0, 0.0])  # one score per sequence
with torch.no_grad():  # the reward is data, a fixed coefficient: no graph
    rewards = torch.where(mask, -beta * (log_pi - log_ref), 0.0)  # −β k1
    rewards[torch.arange(batch_size), lengths - 1] += task_reward  # last real token

log_r = log_ref - log_pi  # GRPO: k3 with r = π_ref / π, per real token, in the loss
grpo_kl_term = beta * (torch.expm1(log_r) - log_r) * mask  # keeps its graph

# %% active="ipynb"
# print("exact KL per position:\n", full_kl.detach())
# print("rewards (RLHF), score at the last real token:\n", rewards)
# print("per-token k3 term (GRPO):\n", grpo_kl_term.detach())

# %% [markdown]
# ## What to put in the loss
#
# Each choice is a per-token loss; its expected gradient over tokens $x$ from a sampler
# (its probabilities held fixed) is computed exactly over a small vocabulary. With the
# sample fixed, $\nabla k_3 = (1 - r)\,\nabla \log \pi_\theta(x)$, whose expectation is
# $-\sum_x \pi_{\text{ref}}(x)\,\nabla \log \pi_\theta(x) = \nabla
# D_{\mathrm{KL}}(\pi_{\text{ref}}\,\|\,\pi_\theta)$ {✓
# test_k3_in_the_loss_has_the_forward_kl_gradient}; $\nabla k_2 = -\log r\,\nabla \log
# \pi_\theta$, like $\mathrm{sg}(k_1) \log \pi_\theta$ ($k_1$ in the reward), has the
# reverse KL's {✓ test_k2_k1_reward_ratio_k3_and_k3_plus_have_the_reverse_kl_gradient}.
# $k_3 \cdot \pi_\theta / \mathrm{sg}(\pi_{\text{old}})$ has the reverse KL as its
# expectation even from a stale $\pi_{\text{old}}$ {✓
# test_ratio_weighted_k3_has_the_reverse_kl_as_its_expectation_from_a_stale_sampler};
# verl's `"k3+"` has $k_3$'s value and $k_2$'s gradient {✓
# test_verl_k3_plus_has_k3_value_and_k2_gradient}. The second column samples from a
# stale $\pi_{\text{old}}$:


# %%
def k_estimators(log_ref, log_pi):
    log_r = log_ref - log_pi
    return -log_r, 0.5 * log_r**2, torch.expm1(log_r) - log_r  # k1, k2, k3


# each: per-token loss from (log π_θ, log π_ref, log π_old) of the token
RECIPES = {
    "k3 in the loss (GRPO)": lambda pi, ref, old: k_estimators(ref, pi)[2],
    "k1 in the loss": lambda pi, ref, old: k_estimators(ref, pi)[0],
    "k2 in the loss": lambda pi, ref, old: k_estimators(ref, pi)[1],
    "k1 in the reward": lambda pi, ref, old: k_estimators(ref, pi)[0].detach() * pi,
    "k3 × π_θ/sg(π_old)": lambda pi, ref, old: (
        (pi - old.detach()).exp() * k_estimators(ref, pi)[2]
    ),
    "k3+ (verl)": lambda pi, ref, old: (
        (k := k_estimators(ref, pi))[1] - k[1].detach() + k[2].detach()
    ),
}


def expected_gradient(recipe, logits, log_ref, log_sampler=None):
    """E_{x ~ sampler}[∇ loss(x)] over the logits; the sampler defaults to π_θ."""
    logits = logits.detach().clone().requires_grad_()
    log_pi = logits.log_softmax(dim=-1)
    log_old = log_pi.detach() if log_sampler is None else log_sampler
    weights = log_old.exp().detach()  # the tokens' probabilities, not differentiated
    loss = (weights * RECIPES[recipe](log_pi, log_ref, log_old)).sum()
    return torch.autograd.grad(loss, logits)[0]


def kl_gradient(logits, log_ref, direction):
    """∇ of KL(π‖π_ref) ("reverse") or KL(π_ref‖π) ("forward") over the logits."""
    logits = logits.detach().clone().requires_grad_()
    log_pi = logits.log_softmax(dim=-1)
    pair = (log_ref, log_pi) if direction == "reverse" else (log_pi, log_ref)
    kl = F.kl_div(*pair, reduction="sum", log_target=True)
    return torch.autograd.grad(kl, logits)[0]


draws = torch.randn(3, 5, generator=generator, dtype=torch.float64)
small_logits = draws[0]
small_reference = (draws[0] + draws[1]).log_softmax(dim=-1)
small_old = (draws[0] + 0.5 * draws[2]).log_softmax(dim=-1)  # the stale policy
grad_reverse_kl = kl_gradient(small_logits, small_reference, "reverse")
grad_forward_kl = kl_gradient(small_logits, small_reference, "forward")

# %% active="ipynb"
# def distance_to(target, recipe, log_sampler=None):
#     gradient = expected_gradient(recipe, small_logits, small_reference, log_sampler)
#     return (gradient - target).abs().max().item()
#
# print("max |E[∇ loss] − ∇ KL(π‖π_ref)|   on-policy   from stale π_old"
#       "   (on-policy, to ∇ KL(π_ref‖π))")
# for recipe in RECIPES:
#     print(f"{recipe:22} {distance_to(grad_reverse_kl, recipe):10.1e}"
#           f" {distance_to(grad_reverse_kl, recipe, small_old):15.1e}"
#           f" {distance_to(grad_forward_kl, recipe):15.1e}")

# %% [markdown]
# On-policy, the four reverse recipes agree to rounding
# {✓ test_k2_k1_reward_ratio_k3_and_k3_plus_have_the_reverse_kl_gradient}; from a
# stale $\pi_{\text{old}}$ only the ratio-weighted $k_3$ stays exact {✓
# test_only_ratio_weighted_k3_stays_exact_when_tokens_come_from_a_stale_policy}:
# the others need $\pi_\theta / \pi_{\text{old}}$ detached {✓
# test_k2_k1_reward_and_k3_plus_need_the_stale_weight_detached}.
#
# ## Per token or per sequence
#
# A per-token $k_2$ term, or a $k_1$ reward credited to its own token,
# differentiates each position's KL with its prefix held fixed
# {✓ test_per_token_terms_miss_the_prefix_part_of_the_sequence_kl_gradient}, but
# the sequence KL also depends on which prefixes the policy makes likely:
# $\nabla D_{\text{seq}}$ is $\mathbb{E}\big[\sum_t \nabla D_t\big]$ plus
# $\mathbb{E}\big[\sum_t D_t\,\nabla \log \pi_\theta(y_{<t})\big]$
# {✓ test_sequence_kl_gradient_is_the_prefix_fixed_part_plus_a_score_term}. $k_1$
# in the reward through returns $G_t = \sum_{s \ge t} k_{1,s}$ gets both terms
# {✓ test_k1_in_the_reward_through_returns_has_the_sequence_kl_gradient}; here a
# two-token model over three tokens, every sequence enumerated:

# %%
VOCAB_TINY = 3
shapes = [(VOCAB_TINY,), (VOCAB_TINY, VOCAB_TINY)] * 2  # π, then π_ref
first_logits, second_logits, ref_first, ref_second = [
    torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes
]


def per_step_log_probs(first, second):
    """log π(y1) and log π(y2 | y1) for all 3 × 3 sequences, shape (2, 3, 3)."""
    log_first = first.log_softmax(dim=-1)[:, None].expand(-1, VOCAB_TINY)
    return torch.stack([log_first, second.log_softmax(dim=-1)])


def sequence_kl_gradients():
    """∇ over both logits tables of the sequence KL and of each per-token term."""
    params = [table.clone().requires_grad_() for table in (first_logits, second_logits)]
    log_pi = per_step_log_probs(*params)
    log_ref = per_step_log_probs(ref_first, ref_second)
    log_seq = log_pi.sum(dim=0)  # log π(y1, y2)
    weights = log_seq.exp().detach()  # every sequence, weighted by its probability
    k1, k2 = (log_pi - log_ref).detach(), k_estimators(log_ref, log_pi)[1]
    returns = k1.flip(0).cumsum(0).flip(0)  # G_t = Σ_{s ≥ t} k1_s
    losses = {
        "exact sequence KL": (log_seq.exp() * (log_seq - log_ref.sum(dim=0))).sum(),
        "k1 in the reward, returns": (weights * (returns * log_pi).sum(dim=0)).sum(),
        "k1 in the reward, own token": (weights * (k1 * log_pi).sum(dim=0)).sum(),
        "k2 per token in the loss": (weights * k2.sum(dim=0)).sum(),
    }

    def flat_gradient(loss):
        gradients = torch.autograd.grad(loss, params, retain_graph=True)
        return torch.cat([g.flatten() for g in gradients])

    return {name: flat_gradient(loss) for name, loss in losses.items()}


sequence_gradients = sequence_kl_gradients()

# %% active="ipynb"
# exact = sequence_gradients["exact sequence KL"]
# for name, gradient in sequence_gradients.items():
#     print(f"{name:28} max |∇ − ∇ KL_seq| = {(gradient - exact).abs().max():.1e}")

# %% [markdown]
# ## What to remember
#
# - For the gradient of $D_{\mathrm{KL}}(\pi_\theta\,\|\,\pi_{\text{ref}})$: $k_2$
#   in the loss, $k_1$ detached in the reward, or $k_3 \cdot \pi_\theta /
#   \mathrm{sg}(\pi_{\text{old}})$; not $k_3$ alone (the forward KL's), nor $k_1$
#   alone (zero) {✓ test_reverse_kl_gradient_recipes_hold_for_any_logits}. From
#   a stale sampler only the last stays exact {✓
#   test_only_ratio_weighted_k3_stays_exact_when_tokens_come_from_a_stale_policy}.
# - `logits.float().log_softmax(dim=-1)`, bfloat16 logits included {✓
#   test_bfloat16_log_softmax_puts_the_per_position_kl_far_off}.
# - Rewards under `torch.no_grad()`
#   {✓ test_rewards_carry_no_graph_although_the_policy_log_probs_do}, the score at
#   the last real token {✓
#   test_task_score_lands_on_the_last_real_token_and_padding_gets_nothing}.
# - Per-token terms hold the prefix fixed
#   {✓ test_per_token_terms_miss_the_prefix_part_of_the_sequence_kl_gradient};
#   $k_1$ through returns gives the sequence KL's gradient
#   {✓ test_k1_in_the_reward_through_returns_has_the_sequence_kl_gradient}.
# - The aggregation sets $\beta$ per token {✓ test_rl_kl_in_trl_and_verl::
#   test_aggregation_sets_the_kl_weight_per_token_as_the_page_says}.
