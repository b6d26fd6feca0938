# %% [markdown]
# # Half precision: float16, bfloat16 and the KL
#
# float16 and bfloat16 both fit in 16 bits and fail differently. float16 keeps 11
# significant bits but a narrow range
# {✓ test_bfloat16_has_float32_range_and_8_significant_bits}: over a large
# vocabulary `softmax` rounds most probabilities to 0
# {✓ test_float16_softmax_rounds_most_probabilities_to_zero_bfloat16_none}, a mask
# of `torch.finfo(torch.float16).min` overflows to $-\infty$ once the log-sum-exp
# of the logits reaches 16 {✓ test_finfo_min_overflows_once_the_logsumexp_reaches_16},
# and on CPU a float16 `log_softmax` is $-\infty$ everywhere once the row's sum of
# exponentials $\sum_j e^{z_j - \max z}$ reaches 65,520 (65,520 equal logits, say)
# {✓ test_float16_cpu_log_softmax_overflows_iff_its_sum_of_exponentials_reaches_65520}
# {✓ test_float16_cpu_log_softmax_is_minus_infinity_from_65520_equal_logits}.
# bfloat16 has float32's range
# {✓ test_bfloat16_has_float32_range_and_8_significant_bits}, so none of float16's
# range failures happen
# {✓ test_float16_softmax_rounds_most_probabilities_to_zero_bfloat16_none}
# {✓ test_finfo_min_survives_in_float32_and_bfloat16}
# {✓ test_float16_cpu_log_softmax_is_minus_infinity_from_65520_equal_logits}, but
# it keeps 8 significant bits: a KL comes out rounded
# {✓ test_half_log_softmax_is_finite_but_rounded}. And float32's own failures are
# bfloat16's too: a probability below half its smallest positive value rounds to 0
# {✓ test_softmax_rounds_a_probability_to_zero_exactly_beyond_the_underflow_gap},
# so `softmax` then `log` gives NaN in both
# {✓ test_bfloat16_softmax_then_log_is_nan_where_float32_is_and_a_little_sooner},
# and so does a $-\infty$ mask
# {✓ test_minus_infinity_mask_is_nan_where_the_target_is_zero_in_every_type}.
# The fix is the same for both 16-bit types: mask with a moderate constant
# {✓ test_mask_value_gives_the_kl_over_unmasked_classes_in_every_type} and compute
# log-probabilities in float32
# {✓ test_mask_value_with_float32_log_softmax_at_llm_vocabularies}.
#
# If you came with a symptom:
#
# - NaN with a `finfo.min` mask, in float16: [a mask value that survives
#   log_softmax](#a-mask-value-that-survives-log_softmax);
# - every log-probability $-\infty$, float16 on CPU: [a sum that
#   overflows](#a-sum-that-overflows);
# - inf or NaN after a float16 `softmax`, or a bfloat16 KL that looks rounded:
#   [a large vocabulary](#a-large-vocabulary);
# - NaN in bfloat16 (or float32): [what bfloat16 shares with
#   float32](#what-bfloat16-shares-with-float32);
# - a KL under `torch.autocast`: [autocast](#autocast).

# %% [markdown]
# ## Two 16-bit formats
#
# The range and precision of each, from `torch.finfo`: `max` is the largest value,
# `tiny` the smallest normal one, `eps` the spacing just above 1. Two more columns
# matter below: the smallest positive value (subnormal)
# {✓ test_smallest_positive_values_are_the_subnormals_of_each_type}, with the gap
# in nats beyond which a probability $e^{-\text{gap}}$ rounds to 0 (below half
# that value)
# {✓ test_softmax_rounds_a_probability_to_zero_exactly_beyond_the_underflow_gap},
# and the spacing next to `finfo.min`.

# %%
import math

import torch
import torch.nn.functional as F

SEED = 0
HALF_TYPES = [torch.float16, torch.bfloat16]


def smallest_positive(dtype):
    """The smallest value above 0 (a subnormal), next after 0 towards 1."""
    zero = torch.zeros((), dtype=dtype)
    return zero.nextafter(torch.ones_like(zero)).item()


def underflow_gap(dtype):
    """The gap in nats beyond which exp(-gap) rounds to 0: half the smallest."""
    return -math.log(smallest_positive(dtype) / 2)


def spacing_at_min(dtype):
    """The distance from finfo.min to the next value up."""
    lowest = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return (lowest.nextafter(torch.zeros_like(lowest)) - lowest).item()


# %% active="ipynb"
# for dtype in [torch.float32, *HALF_TYPES]:
#     info, smallest = torch.finfo(dtype), smallest_positive(dtype)
#     print(f"{str(dtype):15} max {info.max:.3g}  tiny {info.tiny:.3g}"
#           f"  eps {info.eps:.3g}  smallest {smallest:.3g}"
#           f" (gap {underflow_gap(dtype):.1f} nats)"
#           f"  spacing at min {spacing_at_min(dtype):.3g}")

# %% [markdown]
# ## A mask value that survives log_softmax
#
# `log_softmax` returns $z - \operatorname{logsumexp}(z)$. For a class masked with
# $m$, that is $m - \operatorname{logsumexp}(z)$, rounded to the logits' type. With
# $m$ = `torch.finfo(torch.float16).min` $= -65504$, the next float16 below is
# $-\infty$ (the spacing there is 32)
# {✓ test_float16_spacing_at_its_minimum_is_32_and_half_of_it_overflows}, so the
# result rounds to $-\infty$ as soon as the log-sum-exp reaches 16, half that
# spacing {✓ test_finfo_min_overflows_once_the_logsumexp_reaches_16}; $-\infty$
# then meets the target's 0 and the KL is NaN {✓ test_half_precision::
# test_finfo_min_mask_overflows_in_float16_only_once_the_largest_logit_reaches_16}.
# With one dominant logit the log-sum-exp is about the largest logit {✓
# test_finfo_min_mask_overflows_in_float16_only_once_the_largest_logit_reaches_16};
# over a vocabulary of $V$ similar logits it is up to $\log V$ larger, so it can
# reach 16 with every logit well below 16
# {✓ test_finfo_min_overflows_once_the_logsumexp_reaches_16}. In float32 and
# bfloat16 the spacing next to `finfo.min` is astronomically larger (the table
# above) {✓ test_spacing_next_to_finfo_min_is_32_in_float16_and_far_larger_elsewhere}:
# no logit gets there {✓ test_finfo_min_survives_in_float32_and_bfloat16}.
#
# A moderate constant such as $-10^4$ stays finite in all three types and its
# `exp` is exactly 0 {✓ test_numerical_pitfalls::
# test_mask_value_survives_log_softmax_in_all_three_float_types}, as long as the
# real logits stay far above it
# {✓ test_mask_value_gives_the_kl_over_unmasked_classes_in_every_type}
# {✓ test_mask_value_in_float16_itself_survives_at_32k}.


# %%
def kl_with_masked_logits(logits, target, mask, mask_value):
    """F.kl_div after masking the classes where mask is True with mask_value, in
    the logits' dtype; the target must be 0 on the masked classes."""
    log_q = logits.masked_fill(mask, mask_value).log_softmax(dim=-1)
    return F.kl_div(log_q, target.to(logits.dtype), reduction="sum")


MASK_VALUE = -1e4  # finite in every float type; exp() of it is 0
target = torch.tensor([0.6, 0.4, 0.0])  # the target never uses class 2
mask = torch.tensor([False, False, True])  # and the model must not either
largest_logits = [15.0, 15.9921875, 16.0, 30.0]  # 15.99... is float16's last < 16

# %% active="ipynb"
# for largest in largest_logits:
#     logits = torch.tensor([largest, 0.0, 0.5], dtype=torch.float16)
#     fp16_min = torch.finfo(torch.float16).min
#     with_min = kl_with_masked_logits(logits, target, mask, fp16_min)
#     with_constant = kl_with_masked_logits(logits, target, mask, MASK_VALUE)
#     print(f"float16, largest logit {largest:<10g} finfo.min {with_min:8.4f},"
#           f"  {MASK_VALUE:g} {with_constant:.4f}")
# for dtype in [torch.float32, torch.bfloat16]:
#     logits = torch.tensor([30.0, 0.0, 0.5], dtype=dtype)
#     with_min = kl_with_masked_logits(logits, target, mask, torch.finfo(dtype).min)
#     with_constant = kl_with_masked_logits(logits, target, mask, MASK_VALUE)
#     print(f"{dtype}, largest logit 30:  finfo.min {with_min:.4f},"
#           f"  {MASK_VALUE:g} {with_constant:.4f}")

# %% [markdown]
# ## A sum that overflows
#
# On CPU, a float16 `log_softmax` over the last dimension adds up
# $\sum_j e^{z_j - \max z}$ in float32 but stores the sum in float16
# (`serial_vec_log_softmax_lastdim_range` in
# `aten/src/ATen/native/cpu/LogSoftmaxKernelImpl.h` keeps it in a buffer of the
# input's type) {✓ test_half_precision::
# test_float16_cpu_log_softmax_overflows_iff_its_sum_of_exponentials_reaches_65520}.
# Each term is at most 1, and the stored sum rounds to $\infty$ once it reaches
# 65,520: float16's largest value, 65,504, plus half the spacing there (32, the
# table above)
# {✓ test_float16_cpu_log_softmax_is_minus_infinity_from_65520_equal_logits}.
# That takes at least 65,520 logits close to the largest
# {✓ test_float16_cpu_log_softmax_is_minus_infinity_from_65520_equal_logits}: an
# untrained model's output over a 128k vocabulary, say {✓ test_half_precision::
# test_untrained_float16_logits_over_128k_give_minus_infinity_whatever_the_mask}.
# Then every log-probability is $-\infty$, whatever the mask {✓
# test_untrained_float16_logits_over_128k_give_minus_infinity_whatever_the_mask}.
# Casting the logits to float32 first avoids it {✓
# test_untrained_float16_logits_over_128k_give_minus_infinity_whatever_the_mask}.
# (Until PR #103315, part of PyTorch 2.2 according to
# [pytorch#142368], float16 `log_softmax` on CPU raised "not implemented for
# 'Half'". CPU and CUDA float16 `log_softmax` are reported to differ on another
# input, a dim of size 2, in [pytorch#158310]; CUDA was not run here.)
#
# [pytorch#142368]: https://github.com/pytorch/pytorch/issues/142368
# [pytorch#158310]: https://github.com/pytorch/pytorch/issues/158310

# %%
flat_logits = torch.zeros(128_000, dtype=torch.float16)  # all classes alike
classes_at_the_threshold = [65_519, 65_520]  # sums of exponentials, all terms 1

# %% active="ipynb"
# for n_classes in classes_at_the_threshold:
#     equal_logits = torch.zeros(n_classes, dtype=torch.float16)
#     print(f"{n_classes} equal float16 logits:",
#           equal_logits.log_softmax(dim=-1)[:3])
# print("float16 log_softmax, 128,000:", flat_logits.log_softmax(dim=-1)[:3])
# print("float32 log_softmax, 128,000:", flat_logits.float().log_softmax(dim=-1)[:3])

# %% [markdown]
# ## A large vocabulary
#
# float16 cannot represent anything below about $6 \cdot 10^{-8}$
# {✓ test_float16_cannot_represent_values_below_about_6e_8}. Over a vocabulary of
# 128,000 tokens, with logits spread like the ones below (standard deviation 4)
# {✓ test_teacher_logits_have_standard_deviation_about_4}, most probabilities are
# smaller than that
# {✓ test_most_probabilities_of_a_large_vocabulary_are_below_float16_range}, so a
# `softmax` in float16 rounds them to exactly 0
# {✓ test_float16_softmax_rounds_most_probabilities_to_zero_bfloat16_none}, and
# `log` of them to $-\infty$; one class rounded to 0 in both $P$ and $Q$ is enough
# for a NaN {✓ test_float16_softmax_then_log_gives_no_finite_kl_bfloat16_does}.
# `log_softmax` in float16 stays finite but rounds every log-probability to
# float16's digits {✓ test_half_log_softmax_is_finite_but_rounded}. bfloat16
# reaches down to float32's `tiny`
# {✓ test_bfloat16_has_float32_range_and_8_significant_bits}, so its `softmax`
# keeps every probability here
# {✓ test_float16_softmax_rounds_most_probabilities_to_zero_bfloat16_none} and the
# KL stays finite {✓ test_float16_softmax_then_log_gives_no_finite_kl_bfloat16_does},
# but with 8 significant bits the KL itself is rounded
# {✓ test_half_log_softmax_is_finite_but_rounded}: compare its printed value with
# the float32 one. Compute log-probabilities in float32: cast the logits up before
# `log_softmax` {✓ test_upcast_log_softmax_matches_float64}.

# %%
vocab_size = 128_000
generator = torch.Generator().manual_seed(SEED)
teacher_logits, student_logits = 4 * torch.randn(2, 4, vocab_size, generator=generator)


def kl_of_softmax_then_log(student_logits, teacher_logits, dtype):
    """The naive KL: probabilities in dtype, then their log."""
    p = teacher_logits.to(dtype).softmax(dim=-1)
    q = student_logits.to(dtype).softmax(dim=-1)
    return F.kl_div(q.log(), p, reduction="batchmean")


def kl_of_log_softmax(student_logits, teacher_logits, dtype):
    """Log-probabilities in dtype, both sides in log space."""
    return F.kl_div(
        student_logits.to(dtype).log_softmax(dim=-1),
        teacher_logits.to(dtype).log_softmax(dim=-1),
        reduction="batchmean",
        log_target=True,
    )


kl_upcast = kl_of_log_softmax(student_logits, teacher_logits, torch.float32)
student_half, teacher_half = student_logits.half(), teacher_logits.half()
kl_half_upcast = kl_of_log_softmax(student_half, teacher_half, torch.float32)

# %% active="ipynb"
# for dtype in HALF_TYPES:
#     q = student_logits.to(dtype).softmax(dim=-1)
#     naive = kl_of_softmax_then_log(student_logits, teacher_logits, dtype)
#     in_log_space = kl_of_log_softmax(student_logits, teacher_logits, dtype)
#     print(f"{dtype}: probabilities rounded to 0: {(q == 0).float().mean():.1%};"
#           f" softmax then log {naive}; log_softmax {in_log_space}")
# print(f"float32 log_softmax: {kl_upcast:.4f}")

# %% [markdown]
# ## What bfloat16 shares with float32
#
# bfloat16's range is float32's
# {✓ test_bfloat16_has_float32_range_and_8_significant_bits}, and so are its
# underflows: a probability $e^{-\text{gap}}$ rounds to 0 once the gap below the
# largest logit passes the table's figure for the type
# {✓ test_softmax_rounds_a_probability_to_zero_exactly_beyond_the_underflow_gap},
# a little sooner in bfloat16 (fewer subnormals) than in float32
# {✓ test_bfloat16_underflows_a_little_before_float32}. Where both $P$ and $Q$
# round to 0, `softmax` then `log` gives $0 \cdot (-\infty)$ in `kl_div`: NaN
# {✓ test_bfloat16_softmax_then_log_is_nan_where_float32_is_and_a_little_sooner}
# {✓ test_confident_logits_give_nan_after_softmax_then_log_in_float32_and_bfloat16}.
# A class masked with $-\infty$ where the target is 0 gives the same NaN in every
# type {✓ test_minus_infinity_mask_is_nan_where_the_target_is_zero_in_every_type}.
# `log_softmax` with a moderate mask avoids both, in bfloat16 as in float32
# {✓ test_bfloat16_softmax_then_log_is_nan_where_float32_is_and_a_little_sooner}.
# Below, $P = Q$, so the KL is 0 where it is computed at all
# {✓ test_bfloat16_softmax_then_log_is_nan_where_float32_is_and_a_little_sooner}.


# %%
def kl_of_two_classes(second_logit, dtype):
    """KL(P‖P), P = softmax([0, second_logit]) in dtype: (softmax then log,
    log_softmax). A gap of g nats is second_logit = -g; a mask, its value."""
    logits = torch.tensor([0.0, second_logit], dtype=dtype)
    p = logits.softmax(dim=-1)
    naive = F.kl_div(p.log(), p, reduction="sum")
    in_log_space = F.kl_div(logits.log_softmax(dim=-1), p, reduction="sum")
    return naive.item(), in_log_space.item()


second_logits = {
    "gap 90": -90.0,
    "gap 100": -100.0,
    "gap 110": -110.0,
    "-inf mask": -torch.inf,
    "-1e4 mask": MASK_VALUE,
}

# %% active="ipynb"
# for dtype in [torch.float32, torch.bfloat16]:
#     for case, second_logit in second_logits.items():
#         naive, in_log_space = kl_of_two_classes(second_logit, dtype)
#         print(f"{str(dtype):15} {case:10} softmax then log {naive:g},"
#               f" log_softmax {in_log_space:g}")

# %% [markdown]
# ## Autocast
#
# `torch.autocast` does not do that for you everywhere. On CPU, as measured below,
# it runs `kl_div` in float32 but leaves `log_softmax` in half precision
# {✓ test_cpu_autocast_runs_kl_div_but_not_log_softmax_in_float32}, and a float32
# `kl_div` of rounded log-probabilities keeps their error
# {✓ test_autocast_keeps_the_error_of_half_precision_log_softmax}. On CUDA, the
# lists in `aten/src/ATen/autocast_mode.h`, registered for CUDA in
# `autocast_mode.cpp`, put `kl_div` on the float32 list (`AT_FORALL_FP32`) and
# `log_softmax` on the list that runs in float32 unless a `dtype` is given
# (`AT_FORALL_FP32_SET_OPT_DTYPE`)
# {✓ test_installed_autocast_header_lists_kl_div_and_log_softmax_in_float32}
# {✓ test_cuda_autocast_runs_kl_div_and_log_softmax_in_float32}; that is read from
# the source and was not run here (no GPU).


# %%
def kl_under_autocast(student_logits, teacher_logits, dtype=torch.bfloat16):
    """KL of a half-precision forward pass under CPU autocast, and log Q's dtype."""
    with torch.autocast("cpu", dtype=dtype):
        log_q = student_logits.to(dtype).log_softmax(dim=-1)
        log_p = teacher_logits.to(dtype).log_softmax(dim=-1)
        kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl, log_q.dtype


# %% active="ipynb"
# kl_autocast, log_q_dtype = kl_under_autocast(student_half, teacher_half, torch.half)
# print(f"float16 logits, autocast(float16) on CPU: {kl_autocast:.4f}")
# print(f"float16 logits, cast to float32 first:    {kl_half_upcast:.4f}")
# print(f"  kl_div ran in {kl_autocast.dtype}, log_softmax in {log_q_dtype}")

# %% [markdown]
# ## What to remember
#
# - Mask logits with a moderate constant such as `MASK_VALUE = -1e4`
#   {✓ test_mask_value_gives_the_kl_over_unmasked_classes_in_every_type}, not
#   `torch.finfo(torch.float16).min`, which turns into NaN once the log-sum-exp of
#   the logits reaches 16 {✓ test_summary_calls_run_as_written}
#   {✓ test_finfo_min_overflows_once_the_logsumexp_reaches_16}.
# - Compute log-probabilities in float32: `logits.float().log_softmax(dim=-1)`,
#   whatever the model's dtype
#   {✓ test_mask_value_with_float32_log_softmax_at_llm_vocabularies} and even
#   under CPU autocast {✓ test_upcast_under_cpu_autocast_matches_float64}, which
#   by itself leaves `log_softmax` in half precision
#   {✓ test_cpu_autocast_runs_kl_div_but_not_log_softmax_in_float32} and the KL
#   with that error {✓ test_autocast_keeps_the_error_of_half_precision_log_softmax}.
# - float16 fails by range (zeros, $-\infty$, NaN)
#   {✓ test_float16_softmax_then_log_gives_no_finite_kl_bfloat16_does}; bfloat16
#   by precision (a KL rounded to 8 significant bits)
#   {✓ test_half_log_softmax_is_finite_but_rounded}. A NaN in bfloat16 has the
#   causes it has in float32: `softmax` then `log` past the underflow
#   {✓ test_bfloat16_softmax_then_log_is_nan_where_float32_is_and_a_little_sooner},
#   a $-\infty$ mask
#   {✓ test_minus_infinity_mask_is_nan_where_the_target_is_zero_in_every_type}.
