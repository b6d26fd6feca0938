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
# an estimator of a value is not an estimator of its gradient. The estimators
# themselves are on the previous page, [KL estimators in RL
# fine-tuning](rl_estimators.py).
#
# On this page you will compute the per-token terms from a padded batch, check
# each choice against the exact gradient, see what per-token terms miss of the
# sequence KL and how length normalisation rescales $\beta$, and find these
# choices under the names TRL and verl give them.

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
# Each
# per-position KL is exact from the two logits tables (verl lists it as `"full"`)
# {✓ test_full_kl_with_kl_div_matches_float64_definition_at_real_sizes};
# $k_1$ and $k_3$ of the sampled token are its one-sample estimates, whose
# expectation under $\pi_\theta$ is that KL {✓
# test_full_per_position_kl_is_the_policy_expectation_of_k1_and_of_k3}.
# The page's PPO-style reward subtracts $\beta k_1$ per token and adds the task
# score at each sequence's *last real token* (TRL's PPO trainer usually uses the
# slot after it, below)
# {✓ test_task_score_lands_on_the_last_real_token_and_padding_gets_nothing};
# the reward is data, so it is computed without a graph
# {✓ test_rewards_carry_no_graph_although_the_policy_log_probs_do}. GRPO adds
# $\beta k_3$ per token to the loss
# {✓ test_grpo_term_is_beta_k3_on_real_tokens_and_never_negative}.

# %%
import torch
import torch.nn.functional as F

SEED = 0
generator = torch.Generator().manual_seed(SEED)
batch_size, seq_len, vocab_size, beta = 2, 6, 50, 0.1
policy_logits = torch.randn(batch_size, seq_len, vocab_size, generator=generator)
policy_logits.requires_grad_()  # as the live policy's output would
reference_logits = policy_logits.detach() + 0.3 * torch.randn(
    batch_size, seq_len, vocab_size, generator=generator
)
lengths = torch.tensor([6, 4])  # the second sequence ends early: 2 padding tokens
mask = torch.arange(seq_len) < lengths[:, None]
policy_probs = policy_logits.detach().softmax(dim=-1).view(-1, vocab_size)
tokens = torch.multinomial(policy_probs, 1, generator=generator)  # what it generated
tokens = tokens.view(batch_size, seq_len)

log_probs = policy_logits.log_softmax(dim=-1)
reference_log_probs = reference_logits.log_softmax(dim=-1)
log_pi = log_probs.gather(-1, tokens[..., None]).squeeze(-1)
log_ref = reference_log_probs.gather(-1, tokens[..., None]).squeeze(-1)

# the exact KL at every position, over the whole vocabulary; padding counts 0
full_kl = F.kl_div(reference_log_probs, log_probs, reduction="none", log_target=True)
full_kl = full_kl.sum(dim=-1) * mask


def rlhf_rewards(log_pi, log_ref, task_reward, lengths, beta):
    """−β k1 per real token, plus the task score at each sequence's last real
    token; no graph: the reward is a fixed coefficient, not a loss."""
    with torch.no_grad():
        mask = torch.arange(log_pi.shape[-1]) < lengths[:, None]
        rewards = torch.where(
            mask, -beta * (log_pi - log_ref), 0.0
        )  # k1 = log π − log π_ref
        rewards[torch.arange(len(lengths)), lengths - 1] += task_reward
    return rewards


task_reward = torch.tensor([1.0, 0.0])  # one score per sequence
rewards = rlhf_rewards(log_pi, log_ref, task_reward, lengths, beta)

# GRPO: k3 with r = π_ref / π, per real token, in the loss (it keeps its graph)
log_r = log_ref - log_pi
grpo_kl_term = beta * (torch.expm1(log_r) - log_r) * mask

# %% active="ipynb"
# print("exact KL per position:\n", full_kl.detach())
# print("rewards (RLHF), score at the last real token:\n", rewards)
# print("rewards carry a graph:", rewards.requires_grad)
# print("per-token k3 term (GRPO):\n", grpo_kl_term.detach())

# %% [markdown]
# ## What to put in the loss
#
# Each choice is written as a per-token loss; its expected gradient over tokens
# $x$ drawn from a sampler (the sampler's probabilities held fixed) is computed
# exactly over a small vocabulary and compared with the exact gradients of both
# KLs. Differentiated with the sample fixed, $\nabla k_3 = (1 - r)\,\nabla \log
# \pi_\theta(x)$, whose expectation is $-\sum_x \pi_{\text{ref}}(x)\,\nabla \log
# \pi_\theta(x) = \nabla D_{\mathrm{KL}}(\pi_{\text{ref}}\,\|\,\pi_\theta)$
# {✓ test_k3_in_the_loss_has_the_forward_kl_gradient}.
# $\nabla k_2 = -\log r\,\nabla \log \pi_\theta$ has the reverse KL's expectation,
# as has the score-function term $\mathrm{sg}(k_1) \log \pi_\theta$ that $k_1$ in
# the reward becomes
# {✓ test_k2_k1_reward_ratio_k3_and_k3_plus_have_the_reverse_kl_gradient}.
# Multiplying $k_3$ by $\pi_\theta / \mathrm{sg}(\pi_{\text
# {old}})$ makes it $\sum_x \pi_\theta(x) k_3(x)$ in expectation, the reverse KL
# itself, even when the tokens came from $\pi_{\text{old}}$
# {✓ test_ratio_weighted_k3_has_the_reverse_kl_as_its_expectation_from_a_stale_sampler}.
# verl's `"k3+"` keeps $k_3$'s value with $k_2$'s gradient
# {✓ test_verl_k3_plus_has_k3_value_and_k2_gradient}. The second column samples from a
# stale $\pi_{\text{old}}$ instead.


# %%
def k_estimators(log_ref, log_pi):
    log_r = log_ref - log_pi
    return -log_r, 0.5 * log_r**2, torch.expm1(log_r) - log_r  # k1, k2, k3


def k3_plus(log_ref, log_pi):
    """verl's "k3+": k3's value, k2's gradient (a straight-through estimator)."""
    _, k2, k3 = k_estimators(log_ref, log_pi)
    return k2 - k2.detach() + k3.detach()


# each: per-token loss from (log π_θ, log π_ref, log π_old) of the token
RECIPES = {
    "k3 in the loss (GRPO)": lambda pi, ref, old: k_estimators(ref, pi)[2],
    "k1 in the loss": lambda pi, ref, old: k_estimators(ref, pi)[0],
    "k2 in the loss": lambda pi, ref, old: k_estimators(ref, pi)[1],
    "k1 in the reward": lambda pi, ref, old: k_estimators(ref, pi)[0].detach() * pi,
    "k3 × π_θ/sg(π_old)": lambda pi, ref, old: (
        (pi - old.detach()).exp() * k_estimators(ref, pi)[2]
    ),
    "k3+ (verl)": lambda pi, ref, old: k3_plus(ref, pi),
}


def expected_gradient(recipe, logits, log_ref, log_sampler=None):
    """E_{x ~ sampler}[∇ loss(x)] over the logits; the sampler defaults to π_θ."""
    logits = logits.detach().clone().requires_grad_()
    log_pi = logits.log_softmax(dim=-1)
    log_old = log_pi.detach() if log_sampler is None else log_sampler
    weights = log_old.exp().detach()  # the tokens' probabilities, not differentiated
    loss = (weights * RECIPES[recipe](log_pi, log_ref, log_old)).sum()
    (gradient,) = torch.autograd.grad(loss, logits)
    return gradient


def kl_gradient(logits, log_ref, direction):
    """∇ of KL(π‖π_ref) ("reverse") or KL(π_ref‖π) ("forward") over the logits."""
    logits = logits.detach().clone().requires_grad_()
    log_pi = logits.log_softmax(dim=-1)
    if direction == "reverse":
        kl = F.kl_div(log_ref, log_pi, reduction="sum", log_target=True)
    else:
        kl = F.kl_div(log_pi, log_ref, reduction="sum", log_target=True)
    (gradient,) = torch.autograd.grad(kl, logits)
    return gradient


small_logits = torch.randn(5, generator=generator, dtype=torch.float64)
small_reference = small_logits + torch.randn(
    5, generator=generator, dtype=torch.float64
)
small_reference = small_reference.log_softmax(dim=-1)
small_old = small_logits + 0.5 * torch.randn(
    5, generator=generator, dtype=torch.float64
)
small_old = small_old.log_softmax(dim=-1)
grad_reverse_kl = kl_gradient(small_logits, small_reference, "reverse")
grad_forward_kl = kl_gradient(small_logits, small_reference, "forward")


def distance_to(target, recipe, log_sampler=None):
    gradient = expected_gradient(recipe, small_logits, small_reference, log_sampler)
    return (gradient - target).abs().max().item()


# %% active="ipynb"
# print("max |E[∇ loss] − ∇ KL(π‖π_ref)|   on-policy   from stale π_old"
#       "   (on-policy, to ∇ KL(π_ref‖π))")
# for recipe in RECIPES:
#     print(f"{recipe:22} {distance_to(grad_reverse_kl, recipe):10.1e}"
#           f" {distance_to(grad_reverse_kl, recipe, small_old):15.1e}"
#           f" {distance_to(grad_forward_kl, recipe):15.1e}")

# %% [markdown]
# On-policy, $k_2$, $k_1$ in the reward, the ratio-weighted $k_3$ and `"k3+"`
# agree with the reverse KL's gradient to rounding
# {✓ test_k2_k1_reward_ratio_k3_and_k3_plus_have_the_reverse_kl_gradient};
# $k_3$ in the loss agrees with the forward KL's
# {✓ test_k3_in_the_loss_has_the_forward_kl_gradient}, and $k_1$ in the loss with
# neither (its expected gradient is zero)
# {✓ test_k1_in_the_loss_has_zero_expected_gradient}. From a stale
# $\pi_{\text{old}}$ only the ratio-weighted $k_3$ stays exact
# {✓ test_only_ratio_weighted_k3_stays_exact_when_tokens_come_from_a_stale_policy}.
# $k_2$, $k_1$ in the reward and `"k3+"` would need the weight
# $\pi_\theta / \pi_{\text{old}}$ detached; multiplied by it undetached, as $k_3$ is,
# they miss the gradient {✓
# test_k2_k1_reward_and_k3_plus_need_the_stale_weight_detached}.
#
# ## Per token or per sequence
#
# A per-token $k_2$ term, or a $k_1$ reward credited to its own token,
# differentiates each position's KL with the prefix held fixed
# {✓ test_per_token_terms_miss_the_prefix_part_of_the_sequence_kl_gradient}.
# The sequence KL also depends on which prefixes the policy makes likely:
# $\nabla D_{\text{seq}} = \mathbb{E}\big[\sum_t \nabla D_t\big] +
# \mathbb{E}\big[\sum_t D_t\,\nabla \log \pi_\theta(y_{<t})\big]$
# {✓ test_sequence_kl_gradient_is_the_prefix_fixed_part_plus_a_score_term}. $k_1$
# in the reward, propagated through returns $G_t = \sum_{s \ge t} k_{1,s}$,
# credits later tokens' KL to earlier actions and gets both terms
# {✓ test_k1_in_the_reward_through_returns_has_the_sequence_kl_gradient}. Below,
# a two-token model over three tokens, every sequence enumerated:

# %%
VOCAB_TINY = 3
first_logits = torch.randn(VOCAB_TINY, generator=generator, dtype=torch.float64)
second_logits = torch.randn(
    VOCAB_TINY, VOCAB_TINY, generator=generator, dtype=torch.float64
)
ref_first = torch.randn(VOCAB_TINY, generator=generator, dtype=torch.float64)
ref_second = torch.randn(
    VOCAB_TINY, VOCAB_TINY, generator=generator, dtype=torch.float64
)


def per_step_log_probs(first, second):
    """log π(y1) and log π(y2 | y1) for all 3 × 3 sequences, shape (2, 3, 3)."""
    log_first = first.log_softmax(dim=-1)[:, None].expand(-1, VOCAB_TINY)
    return torch.stack([log_first, second.log_softmax(dim=-1)])


def sequence_kl_gradients():
    """∇ of the exact sequence KL, of k1 in the reward through returns, and of a
    per-token k2 loss, over both logits tables."""
    params = [
        first_logits.clone().requires_grad_(),
        second_logits.clone().requires_grad_(),
    ]
    log_pi = per_step_log_probs(*params)
    log_ref = per_step_log_probs(ref_first, ref_second)
    log_seq = log_pi.sum(dim=0)  # log π(y1, y2)
    weights = log_seq.exp().detach()  # every sequence, weighted by its probability
    k1 = (log_pi - log_ref).detach()
    returns = k1.flip(0).cumsum(0).flip(0)  # G_t = Σ_{s ≥ t} k1_s
    losses = {
        "exact sequence KL": (log_seq.exp() * (log_seq - log_ref.sum(dim=0))).sum(),
        "k1 in the reward, returns": (weights * (returns * log_pi).sum(dim=0)).sum(),
        "k1 in the reward, own token": (weights * (k1 * log_pi).sum(dim=0)).sum(),
        "k2 per token in the loss": (
            weights * k_estimators(log_ref, log_pi)[1].sum(dim=0)
        ).sum(),
    }
    return {
        name: torch.cat(
            [g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]
        )
        for name, loss in losses.items()
    }


sequence_gradients = sequence_kl_gradients()

# %% active="ipynb"
# exact = sequence_gradients["exact sequence KL"]
# for name, gradient in sequence_gradients.items():
#     print(f"{name:28} max |∇ − ∇ KL_seq| = {(gradient - exact).abs().max():.1e}")

# %% [markdown]
# Returns recover the sequence KL's gradient
# {✓ test_k1_in_the_reward_through_returns_has_the_sequence_kl_gradient}; a
# per-token $k_2$ term, or a reward that credits each token only its own KL, does
# not {✓ test_per_token_terms_miss_the_prefix_part_of_the_sequence_kl_gradient}.
#
# ## Length normalisation rescales beta
#
# How the per-token loss is averaged sets the weight of each token's KL term, so
# the effective $\beta$ on a sequence's summed KL. With TRL's `loss_type="grpo"`
# (verl `loss_agg_mode="seq-mean-token-mean"`) each sequence's mean is taken, so
# a sequence of length $L_i$ gets $\beta / (B L_i)$ per token
# {✓ test_aggregation_sets_the_kl_weight_per_token_as_the_page_says}, more for a
# shorter sequence
# {✓ test_sequence_mean_gives_short_sequences_a_larger_beta_per_token}; with
# token-mean (TRL `"bnpo"`, and `"dapo"` over the accumulated batch; verl's
# default) every token gets $\beta / N_{\text{tokens}}$
# {✓ test_aggregation_sets_the_kl_weight_per_token_as_the_page_says}. The
# sum-then-normalise modes divide
# each sequence's sum by a horizon that the two libraries choose differently:
# TRL's `"dr_grpo"` by `max_completion_length`, a config constant
# (`grpo_trainer.py`, line 3135), and verl's `"seq-mean-token-sum-norm"` by the
# batch's padded width, `loss_mask.shape[-1]`, unless `loss_scale_factor` is set
# (`core_algos.py`, lines 1189-1193). So verl's weight per token changes with the
# longest response in the batch {✓
# test_verl_sum_norm_divides_by_the_padded_width_unless_a_scale_factor_is_set} and
# TRL's does not
# {✓ test_trl_dr_grpo_divides_by_max_completion_length_whatever_the_padded_width}.
# The weight per token of each
# sequence, from autograd, for this batch padded to `seq_len` and a TRL config
# whose `max_completion_length` is larger:


# %%
def aggregate(per_token, mask, mode, horizon=None):
    """The aggregation modes of TRL's GRPO loss (grpo_trainer.py) and verl's
    agg_loss (core_algos.py). ``horizon`` is what "seq-mean-token-sum-norm"
    divides by: TRL "dr_grpo" passes max_completion_length; verl, unless its
    loss_scale_factor is set, the padded width (the default here)."""
    masked = per_token * mask
    if mode == "seq-mean-token-mean":  # TRL "grpo"
        return (masked.sum(dim=-1) / mask.sum(dim=-1)).mean()
    if mode == "token-mean":  # TRL "bnpo" / "dapo", verl's default
        return masked.sum() / mask.sum()
    if mode == "seq-mean-token-sum-norm":  # TRL "dr_grpo", verl
        horizon = mask.shape[-1] if horizon is None else horizon
        return masked.sum() / (per_token.shape[0] * horizon)
    raise ValueError(f"unknown mode {mode!r}: use one of {AGGREGATIONS}")


AGGREGATIONS = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
max_completion_length = 8  # a TRL config constant; this batch is padded to seq_len
AGGREGATION_CASES = {  # label: (mode, horizon)
    'TRL "grpo"': ("seq-mean-token-mean", None),
    'TRL "bnpo"/"dapo", verl default': ("token-mean", None),
    'TRL "dr_grpo"': ("seq-mean-token-sum-norm", max_completion_length),
    "verl seq-mean-token-sum-norm": ("seq-mean-token-sum-norm", None),
}


def kl_weight_per_token(mode, mask, beta, horizon=None):
    per_token_kl = torch.zeros(mask.shape, requires_grad=True)
    (weight,) = torch.autograd.grad(
        aggregate(beta * per_token_kl, mask, mode, horizon), per_token_kl
    )
    return weight


# %% active="ipynb"
# print(f"lengths {lengths.tolist()}, β = {beta}, padded width {seq_len},"
#       f" max_completion_length {max_completion_length}")
# for label, (mode, horizon) in AGGREGATION_CASES.items():
#     weight = kl_weight_per_token(mode, mask, beta, horizon)
#     per_sequence = ", ".join(f"{w:.4g}" for w in weight[:, 0].tolist())
#     print(f"{label:32} weight per real token, per sequence: {per_sequence}")

# %% [markdown]
# ## The names in TRL and verl
#
# Read from source (TRL `f2cd577`, verl `verl-project/verl` `1dda039`), not run
# here:
#
# - TRL PPO (`trl/experimental/ppo/ppo_config.py`, `ppo_trainer.py`):
#   `kl_estimator`, `"k1"` by default or `"k3"`, with `kl_coef` 0.05, in the
#   reward, computed under `torch.no_grad`; padding log-probs are set to
#   `INVALID_LOGPROB`. The score is added at `actual_end` (lines 767 and
#   778-779): `sequence_lengths_p1` where `sequence_lengths_p1 < rewards.size(1)`,
#   else `sequence_lengths`, which indexes the last token before the first padding
#   token. That is one slot *after* the last non-padding token unless the
#   response fills the width, not the last real token as above {✓
#   test_trl_ppo_adds_the_score_one_slot_after_the_last_real_token_unless_full}.
# - TRL GRPO (`trl/trainer/grpo_config.py`, `grpo_trainer.py`): `beta` defaults
#   to 0.0, which means no KL term and no reference model loaded; otherwise $k_3$
#   in the loss (`per_token_kl`). `use_bias_correction_kl` (PR #4638 for issue
#   #4637) multiplies it by `coef_1`, $\pi_\theta/\pi_{\text{old}}$ per token
#   (lines 3066-3076); with `importance_sampling_level="sequence"` `coef_1` is
#   one ratio per sequence (the exponential of the mean log-ratio), broadcast over
#   its tokens (issue #6586) {✓
#   test_sequence_level_coef_1_is_one_ratio_per_sequence_broadcast_over_tokens}.
#   Its default is `False` at `f2cd577`; PR #6503,
#   merged after that commit, makes it `True`: check the version you run.
#   The vLLM sampler's ratio (`vllm_importance_sampling_correction`) multiplies
#   the policy-gradient term only; $\beta k_3$ is added after it (lines 3117-3121).
#   `loss_type` (default `"dapo"`) picks the aggregation.
# - verl, in the reward (`verl/trainer/config/ppo_trainer.yaml`):
#   `algorithm.use_kl_in_reward` (default `False`), `algorithm.kl_penalty: kl`,
#   $\beta$ = `algorithm.kl_ctrl.kl_coef` (0.001). In the loss
#   (`verl/trainer/config/actor/actor.yaml`): `actor.use_kl_loss` (default
#   `false`), `actor.kl_loss_type: low_var_kl`, `actor.kl_loss_coef` (0.001).
#
# verl's names (`kl_penalty_forward` in `verl/trainer/ppo/core_algos.py`):
# `"kl"`/`"k1"`, `"abs"`, `"mse"`/`"k2"`, `"low_var_kl"`/`"k3"`, which clamps
# $\log r$ to $[-20, 20]$ and $k_3$ to $[-10, 10]$; a `"+"` suffix (`"k3+"`)
# keeps the value with $k_2$'s gradient; `"full"` is listed but raises
# `NotImplementedError`. Issue TRL #4967 asks for $k_1$ in the reward for GRPO,
# citing "A Comedy of Estimators" (arXiv 2512.21852).
#
# ## What to remember
#
# - For the gradient of $D_{\mathrm{KL}}(\pi_\theta\,\|\,\pi_{\text{ref}})$: $k_2$
#   in the loss, or $k_1$ detached in the reward, or $k_3 \cdot \pi_\theta /
#   \mathrm{sg}(\pi_{\text{old}})$
#   {✓ test_reverse_kl_gradient_recipes_hold_for_any_logits} (exact off-policy
#   too {✓
#   test_only_ratio_weighted_k3_stays_exact_when_tokens_come_from_a_stale_policy}).
#   $k_3$ alone in the loss gives the forward KL's gradient
#   {✓ test_reverse_kl_gradient_recipes_hold_for_any_logits}; $k_1$ alone, a zero
#   expected gradient {✓ test_reverse_kl_gradient_recipes_hold_for_any_logits}.
# - Compute rewards under `torch.no_grad()`
#   {✓ test_rewards_carry_no_graph_although_the_policy_log_probs_do}; add the score
#   at each sequence's last real token and mask padding
#   {✓ test_task_score_lands_on_the_last_real_token_and_padding_gets_nothing}.
# - Per-token $k_2$, or $k_1$ credited to its own token, differentiates each
#   position's KL with its prefix fixed
#   {✓ test_per_token_terms_miss_the_prefix_part_of_the_sequence_kl_gradient};
#   $k_1$ through returns differentiates the sequence KL
#   {✓ test_k1_in_the_reward_through_returns_has_the_sequence_kl_gradient}.
# - The loss aggregation sets the effective $\beta$
#   {✓ test_aggregation_sets_the_kl_weight_per_token_as_the_page_says}; TRL's GRPO
#   default `beta` is 0.0, so no KL at all.
