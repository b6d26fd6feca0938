# %% [markdown]
# # Numerical pitfalls: inf, NaN and negative KL
#
# A KL loss can have the right formula and still come out inf, NaN or negative,
# because of floating point: a probability that rounds to 0 and is then logged
# {✓ test_exponentiate_then_log_makes_the_kl_infinite}, a $0 \cdot (-\infty)$
# {✓ test_minus_infinity_meeting_a_zero_target_gives_nan}, a NaN that
# `torch.where` lets through the backward pass
# {✓ test_where_guard_gives_the_right_value_but_nan_gradients}, or an input that
# was never a distribution
# {✓ test_target_summing_to_less_than_1_gives_negative_kl_more_than_1_too_large}.
# Each has its own cure, shown next to it: stay in log space
# {✓ test_log_prob_on_the_grid_matches_the_closed_form_to_4_decimals}; mask the
# logits with a large negative *finite* value, or replace the masked
# log-probabilities after `log_softmax`
# {✓ test_both_mask_fixes_give_the_kl_over_unmasked_classes_at_vocabulary_size};
# sanitise what goes into a log rather than what comes out (`torch.where` lets NaN
# gradients through)
# {✓ test_sanitising_the_log_input_gives_finite_correct_gradients}; and check what
# `F.kl_div` never checks.
#
# On this page you will see each failure on a small tensor, next to its fix:
#
# - underflow: densities far in a tail, mixtures, the log of a `softmax`;
# - zeros: $0 \cdot \log 0$, and masked logits that turn into NaN;
# - NaN gradients through `torch.where`, and with respect to the target;
# - inputs that are not distributions, shapes that broadcast, rounding below 0.
#
# If you came with a symptom:
#
# - an infinite KL: [underflow](#exponentiate-then-log-underflow);
# - NaN in the loss: [zeros and masked logits](#zeros-and-masked-logits);
# - NaN only in the gradients: [NaN gradients](#nan-gradients);
# - a negative or implausible KL: [nothing is validated](#nothing-is-validated);
# - NaN, $-\infty$ or rounded values in float16 or bfloat16: the
#   [half precision](half_precision.py) page.

# %% [markdown]
# ## Exponentiate, then log: underflow
#
# Take $P = \mathcal{N}(0, 1)$ and $Q = \mathcal{N}(0, 0.5^2)$ on a grid. Far in
# the tails $q(x) \propto e^{-2x^2}$ drops below the smallest float32 (about
# $10^{-45}$) while $p(x)$ is still positive: the density rounds to 0
# {✓ test_tail_density_rounds_to_zero_where_the_other_is_positive}, its log is
# $-\infty$ and the divergence comes out infinite
# {✓ test_exponentiate_then_log_makes_the_kl_infinite}. Asking the distribution
# for `log_prob` never leaves log space; its sum over the grid matches the closed
# form to 4 decimals (the last two printed lines)
# {✓ test_log_prob_on_the_grid_matches_the_closed_form_to_4_decimals}.

# %%
import math

import torch
import torch.nn.functional as F
from torch.distributions import Categorical, MixtureSameFamily, Normal, kl_divergence

SEED = 0

x = torch.linspace(-10, 10, 2001)
dx = x[1] - x[0]  # densities times the spacing are probabilities on the grid
p_normal, q_normal = Normal(0.0, 1.0), Normal(0.0, 0.5)

# exp first, log later: q(x) underflows to 0 where p(x) > 0
p_x, q_x = p_normal.log_prob(x).exp(), q_normal.log_prob(x).exp()
kl_via_densities = ((torch.xlogy(p_x, p_x) - torch.xlogy(p_x, q_x)) * dx).sum()

# log space throughout: KL = Σ p(x) (log p(x) − log q(x)) dx
log_p_x, log_q_x = p_normal.log_prob(x), q_normal.log_prob(x)
kl_via_log_prob = (log_p_x.exp() * (log_p_x - log_q_x) * dx).sum()
kl_closed_form = kl_divergence(p_normal, q_normal)

# %% active="ipynb"
# underflowed = x[(q_x == 0) & (p_x > 0)]
# print(f"q(x) = 0 while p(x) > 0 for |x| >= {underflowed.abs().min():.2f}")
# print(f"KL from densities:  {kl_via_densities}")
# print(f"KL from log_prob:   {kl_via_log_prob:.6f}")
# print(f"closed form:        {kl_closed_form:.6f}")

# %% [markdown]
# A mixture's density is a sum, $\log\big(\tfrac12 p_1(x) + \tfrac12 p_2(x)\big)$,
# and the sum of two underflowed densities is still 0
# {✓ test_log_of_summed_densities_is_minus_infinity_far_out}. `torch.logsumexp`
# adds in log space, shifting by the largest term first
# {✓ test_logsumexp_gives_finite_mixture_log_density};
# `MixtureSameFamily.log_prob` does exactly that for you
# {✓ test_mixture_same_family_uses_logsumexp}.

# %%
points = torch.tensor([-60.0, 2.5, 60.0])
log_p1, log_p2 = Normal(-5.0, 1.0).log_prob(points), Normal(10.0, 1.0).log_prob(points)

log_mixture_naive = torch.log(0.5 * log_p1.exp() + 0.5 * log_p2.exp())
log_mixture_stable = torch.logsumexp(
    torch.stack([math.log(0.5) + log_p1, math.log(0.5) + log_p2]), dim=0
)
mixture = MixtureSameFamily(
    Categorical(probs=torch.tensor([0.5, 0.5])),
    Normal(torch.tensor([-5.0, 10.0]), torch.tensor([1.0, 1.0])),
)
log_mixture_library = mixture.log_prob(points)

# %% active="ipynb"
# print("log of the summed densities:", log_mixture_naive)
# print("torch.logsumexp:            ", log_mixture_stable)
# print("MixtureSameFamily.log_prob: ", log_mixture_library)

# %% [markdown]
# The same happens with logits: in float32, the default dtype, `softmax` rounds a
# class 200 nats below the best one to exactly 0 (float64 would still represent it)
# {✓ test_softmax_rounds_200_nats_below_to_zero_in_float32_not_float64}, and
# `log` of it is $-\infty$; `log_softmax` computes
# $z - \operatorname{logsumexp}(z)$ and keeps the finite value
# {✓ test_log_of_softmax_is_minus_infinity_where_log_softmax_is_finite}. Feed
# `F.kl_div` from `log_softmax` on both sides, with `log_target=True`.

# %%
logits = torch.tensor([0.0, -200.0])
log_of_softmax = logits.softmax(dim=-1).log()
log_softmax = logits.log_softmax(dim=-1)

# %% active="ipynb"
# print("softmax(z).log(): ", log_of_softmax)
# print("log_softmax(z):   ", log_softmax)

# %% [markdown]
# ## Zeros and masked logits
#
# Zeros in the target are fine: `F.kl_div` computes `xlogy(target, target)`, so an
# outcome with $P = 0$ contributes 0 {✓ test_zeros_in_the_target_contribute_nothing}.
# Zeros in the *model* are not, when they meet zeros in the target: a logit masked
# with $-\infty$ (a forbidden token, padding) gives $\log Q = -\infty$, and the
# term `target * input` is $0 \cdot (-\infty)$ = NaN
# {✓ test_minus_infinity_meeting_a_zero_target_gives_nan}. Two fixes give the KL
# over the unmasked classes: replace the masked log-probabilities after
# `log_softmax`, or mask the logits with a large negative *finite* value
# {✓ test_both_mask_fixes_give_the_kl_over_the_unmasked_classes}.
#
# Both fixes assume that the target is 0 wherever the model is masked; check it.
# If the target puts mass on a masked class, the true divergence is $+\infty$ and
# either fix would hide it behind a finite number
# {✓ test_mask_fixes_hide_an_infinite_kl_when_the_target_uses_a_masked_class}.

# %%
p_masked = torch.tensor([0.6, 0.4, 0.0])  # the target never uses class 2
mask = torch.tensor([False, False, True])  # and the model must not either
model_logits = torch.tensor([2.0, 1.0, 0.5])
assert (p_masked[mask] == 0).all(), "target mass on a masked class: the KL is inf"

log_q_masked = model_logits.masked_fill(mask, -torch.inf).log_softmax(dim=-1)
kl_with_inf_mask = F.kl_div(log_q_masked, p_masked, reduction="sum")

kl_fixed_after = F.kl_div(
    log_q_masked.masked_fill(mask, 0.0), p_masked, reduction="sum"
)
MASK_VALUE = -1e4  # finite in every float type; exp() of it is 0
log_q_finite = model_logits.masked_fill(mask, MASK_VALUE).log_softmax(dim=-1)
kl_fixed_before = F.kl_div(log_q_finite, p_masked, reduction="sum")

# %% active="ipynb"
# print(f"mask with -inf:                   {kl_with_inf_mask}")
# print(f"-inf, then masked_fill(mask, 0):  {kl_fixed_after:.6f}")
# print(f"mask with {MASK_VALUE:g} instead:        {kl_fixed_before:.6f}")

# %% [markdown]
# The finite value has to survive `log_softmax`. $-10^4$ survives `log_softmax` in
# float32, bfloat16 and float16
# {✓ test_mask_value_survives_log_softmax_in_all_three_float_types}
# {✓ test_both_mask_fixes_give_the_kl_over_unmasked_classes_at_vocabulary_size};
# `torch.finfo(dtype).min`, a common choice, does in float32 and bfloat16
# {✓ test_half_precision::test_finfo_min_survives_in_float32_and_bfloat16} but
# overflows to $-\infty$ in float16 once the log-sum-exp of the logits reaches 16
# {✓ test_half_precision::test_finfo_min_overflows_once_the_logsumexp_reaches_16}.
# The [half precision](half_precision.py) page shows it.

# %% [markdown]
# ### Masked classes on both sides
#
# With `log_target=True` the term is $e^{\log P}(\log P - \log Q)$, so a class
# masked in the target as well ($\log P = \log Q = -\infty$) gives
# $0 \cdot (-\infty + \infty)$ = NaN
# {✓ test_log_target_with_minus_infinity_on_both_sides_gives_nan}. Clamp both
# sides to the same finite floor before the call: the masked terms become
# $0 \cdot 0$ {✓ test_clamping_both_sides_gives_the_kl_over_the_unmasked_classes}.
# The same precondition holds: if the target puts mass on a masked class, the
# clamped call returns a finite number where the true divergence is $+\infty$
# {✓ test_mask_fixes_hide_an_infinite_kl_when_the_target_uses_a_masked_class}.

# %%
log_p_both = torch.tensor([0.6, 0.4, 0.0]).log()  # log P = -inf on class 2
log_q_both = log_q_masked  # log Q = -inf on class 2 too
kl_both_masked = F.kl_div(log_q_both, log_p_both, reduction="sum", log_target=True)
kl_both_clamped = F.kl_div(
    log_q_both.clamp_min(MASK_VALUE),
    log_p_both.clamp_min(MASK_VALUE),
    reduction="sum",
    log_target=True,
)

# %% active="ipynb"
# print(f"log_target=True, -inf on both sides:  {kl_both_masked}")
# print(f"both clamped to {MASK_VALUE:g}:               {kl_both_clamped:.6f}")

# %% [markdown]
# ## NaN gradients
#
# ### torch.where does not stop NaN in the backward pass
#
# A hand-written KL often guards the log with `torch.where`, on $p > 0$. The
# forward value is right, but autograd differentiates *both* branches and
# multiplies the unused one by 0: where $p = 0$ that is $0 \cdot \infty$ = NaN, and
# it spreads to every logit through the softmax ([pytorch#52248])
# {✓ test_where_guard_gives_the_right_value_but_nan_gradients}. The fix is to
# make the untaken branch harmless too: sanitise the argument of the log before
# taking it {✓ test_sanitising_the_log_input_gives_finite_correct_gradients}.
#
# [pytorch#52248]: https://github.com/pytorch/pytorch/issues/52248

# %%
log_q_fixed = torch.tensor([0.3, 0.3, 0.4]).log()


def target_with_an_underflowed_class():
    """Trainable target logits whose softmax rounds the last class to exactly 0."""
    target_logits = torch.tensor([0.0, 1.0, -120.0], requires_grad=True)
    return target_logits, target_logits.softmax(dim=-1)


target_logits, p_trainable = target_with_an_underflowed_class()
kl_guarded = torch.where(
    p_trainable > 0, p_trainable * (p_trainable.log() - log_q_fixed), 0
).sum()
(grad_guarded,) = torch.autograd.grad(kl_guarded, target_logits)

target_logits, p_trainable = target_with_an_underflowed_class()
p_safe = torch.where(p_trainable > 0, p_trainable, 1.0)  # log(1) = 0, gradient 1
kl_sanitised = torch.where(
    p_trainable > 0, p_trainable * (p_safe.log() - log_q_fixed), 0
).sum()
(grad_sanitised,) = torch.autograd.grad(kl_sanitised, target_logits)

# %% active="ipynb"
# print(f"value, guarded with where:  {kl_guarded:.6f}   gradient {grad_guarded}")
# print(f"value, log input sanitised: {kl_sanitised:.6f}   gradient {grad_sanitised}")

# %% [markdown]
# ### The gradient with respect to the target
#
# `F.kl_div`'s default form computes `xlogy(target, target)`. `torch.xlogy` fixes
# the *value* of $0 \cdot \log 0$, but its derivative with respect to its second
# argument is $x / y$, which is $0/0$ where the target is 0
# {✓ test_xlogy_fixes_the_value_not_the_gradient}: the gradient with respect to
# the target is NaN there ([pytorch#89558])
# {✓ test_kl_div_gradient_with_respect_to_a_zero_target_is_nan}. It only matters
# when the target is trainable (mutual learning, a symmetric or Jensen–Shannon
# loss); then pass the target as log-probabilities with `log_target=True`, where
# the term is $e^{\log P}(\log P - \log Q)$ and the gradient stays finite
# {✓ test_log_target_keeps_the_gradient_with_respect_to_the_target_finite}.
#
# A target of log-probabilities passed as probabilities (without `log_target=True`)
# gives NaN {✓ test_log_probabilities_passed_as_the_target_give_nan}. Before
# PyTorch 1.13 ([PR #80334], which made `kl_div` a composite function) the kernel
# computed the term only where the target was positive, so that target gave a
# silent 0 {✓ test_argument_order::
# test_pre_1_13_formula_gave_a_silent_zero_where_now_nan}
# (and the gradient above was 0, not NaN, as [pytorch#89558] reports).
#
# [pytorch#89558]: https://github.com/pytorch/pytorch/issues/89558
# [PR #80334]: https://github.com/pytorch/pytorch/pull/80334

# %%
target_logits, p_trainable = target_with_an_underflowed_class()
kl_probability_target = F.kl_div(log_q_fixed, p_trainable, reduction="sum")
(grad_probability_target,) = torch.autograd.grad(kl_probability_target, target_logits)

target_logits, _ = target_with_an_underflowed_class()
kl_log_target = F.kl_div(
    log_q_fixed, target_logits.log_softmax(dim=-1), reduction="sum", log_target=True
)
(grad_log_target,) = torch.autograd.grad(kl_log_target, target_logits)

target_logits, p_trainable = target_with_an_underflowed_class()
kl_xlogy = (torch.xlogy(p_trainable, p_trainable) - p_trainable * log_q_fixed).sum()
(grad_xlogy,) = torch.autograd.grad(kl_xlogy, target_logits)

# %% active="ipynb"
# print("value and gradient with respect to the target logits:")
# print(f"F.kl_div(log_q, p)      {kl_probability_target:.6f}", grad_probability_target)
# print(f"xlogy, written by hand  {kl_xlogy:.6f}", grad_xlogy)
# print(f"log_target=True         {kl_log_target:.6f}", grad_log_target)

# %% [markdown]
# ## Nothing is validated
#
# `F.kl_div` trusts its inputs completely. A target scaled to sum to $c$ gives
# $c\,\mathrm{KL} + c \log c$ instead of the KL
# {✓ test_target_scaled_by_c_gives_c_kl_plus_c_log_c}: a wrong number, negative
# when the target sums to less than 1 (for some $c$), too large when it sums to
# more {✓ test_target_summing_to_less_than_1_gives_negative_kl_more_than_1_too_large};
# shapes that differ are broadcast without a word
# {✓ test_mismatched_shapes_broadcast_without_a_warning}; and two identical
# distributions can come out a hair below zero from rounding
# {✓ test_identical_distributions_can_round_below_zero} ([pytorch#80488]; below
# is the code of that report, whose last digits depend on the platform).
#
# [pytorch#80488]: https://github.com/pytorch/pytorch/issues/80488

# %%
generator = torch.Generator().manual_seed(SEED)
log_q_rows = torch.randn(4, 5, generator=generator).log_softmax(dim=-1)
p_rows = torch.randn(4, 5, generator=generator).softmax(dim=-1)

kl_rows = F.kl_div(log_q_rows, p_rows, reduction="batchmean")
target_sums = [0.3, 3.0]  # what the target rows sum to, instead of 1
kl_unnormalised = [
    F.kl_div(log_q_rows, c * p_rows, reduction="batchmean") for c in target_sums
]

# an extra singleton dimension: (4, 1, 5) against (4, 5) broadcasts to (4, 4, 5)
terms_broadcast = F.kl_div(log_q_rows.unsqueeze(1), p_rows, reduction="none")
kl_broadcast = F.kl_div(log_q_rows.unsqueeze(1), p_rows, reduction="batchmean")

same_logits = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
terms_identical = F.kl_div(
    F.log_softmax(same_logits, 1), F.softmax(same_logits, 1), reduction="none"
)

# %% active="ipynb"
# print(f"KL(P‖Q), mean over rows:            {kl_rows:.4f}")
# for c, kl in zip(target_sums, kl_unnormalised):
#     print(f"target scaled to sum to {c}:        {kl:.4f}")
# print(f"input (4, 1, 5) vs target (4, 5):   {kl_broadcast:.4f}"
#       f"   terms of shape {tuple(terms_broadcast.shape)}")
# print("identical distributions, 'none':\n", terms_identical)

# %% [markdown]
# The [checked KL](checked_kl.py) refuses the unnormalised and broadcast inputs
# {✓ test_checked_kl_refuses_the_unnormalised_and_broadcast_inputs}, and given the
# same log-probabilities twice it returns exactly 0
# {✓ test_checked_kl_gives_exactly_zero_for_identical_log_probabilities}: the
# negative term above comes from comparing `F.log_softmax(same_logits, 1)` with the
# log that `F.kl_div` takes of `F.softmax(same_logits, 1)`, two roundings of the
# same number {✓ test_negative_term_comes_from_logging_the_softmax_a_second_time}.
# Where a divergence must not be negative (before a square root, say),
# `.clamp_min(0)` removes what is left of such rounding
# {✓ test_clamp_min_removes_the_rounding}.

# %% [markdown]
# ## What to remember
#
# - Stay in log space: `log_prob`, `log_softmax`, `torch.logsumexp`,
#   `log_target=True`. Never `logits.softmax(dim=-1).log()` ($-\infty$ where a
#   class underflows) {✓ test_summary_calls_run_as_written}: use
#   `logits.log_softmax(dim=-1)`
#   {✓ test_log_of_softmax_is_minus_infinity_where_log_softmax_is_finite}.
# - Mask logits with a finite `MASK_VALUE = -1e4`
#   {✓ test_both_mask_fixes_give_the_kl_over_unmasked_classes_at_vocabulary_size},
#   not $-\infty$ (NaN where it meets a zero target)
#   {✓ test_minus_infinity_meeting_a_zero_target_gives_nan} and not
#   `torch.finfo(dtype).min` (NaN in float16 once the logits' log-sum-exp reaches
#   16) {✓ test_finfo_min_named_in_the_summary_is_nan_in_float16_only}; or replace
#   masked log-probabilities after `log_softmax`
#   {✓ test_both_mask_fixes_give_the_kl_over_unmasked_classes_for_any_mask}.
# - `torch.where` and `torch.xlogy` fix values, not gradients
#   {✓ test_where_guard_gives_the_right_value_but_nan_gradients}
#   {✓ test_xlogy_fixes_the_value_not_the_gradient}: sanitise what goes into the
#   log {✓ test_sanitising_the_log_input_gives_finite_correct_gradients}, or keep
#   the trainable side in log space
#   {✓ test_log_target_keeps_the_gradient_with_respect_to_the_target_finite}.
# - `F.kl_div` checks nothing: normalise the target
#   {✓ test_target_scaled_by_c_gives_c_kl_plus_c_log_c}, match shapes
#   {✓ test_mismatched_shapes_broadcast_without_a_warning}, and expect rounding a
#   hair below 0 {✓ test_identical_distributions_can_round_below_zero}
#   (`.clamp_min(0)` where it matters) {✓ test_clamp_min_removes_the_rounding}.
# - In float16 or bfloat16, compute log-probabilities in float32
#   ([half precision](half_precision.py)).
