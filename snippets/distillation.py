# %% [markdown]
# # Knowledge distillation: temperature and the T² factor
#
# A student learns from a teacher's *soft* targets: both distributions are softened
# by a temperature $T$, and the loss is
# $T^2 \cdot D_{\mathrm{KL}}\big(\mathrm{softmax}(z_t / T)\,\|\,\mathrm{softmax}(z_s /
# T)\big)$, averaged over the batch ([Hinton et al., 2015], who write it as the
# cross-entropy against the soft targets: the same gradient, since the two differ
# by the teacher's entropy, a constant
# {✓ test_soft_target_cross_entropy_has_the_same_student_gradient_as_the_kl}). In
# PyTorch the loss is the block below, the same as the page's `distillation_loss`
# {✓ test_prose_formula_runs_as_written_and_is_the_page_loss}, with student logits
# `z_s`, teacher logits `z_t` and temperature `T`:
#
# ```python
# loss = F.kl_div(
#     F.log_softmax(z_s.float() / T, dim=-1),
#     F.log_softmax(z_t.float() / T, dim=-1),
#     reduction="batchmean",
#     log_target=True,
# ) * T**2
# ```
#
# Student first, in log space, each normalised over the classes with `dim=-1`:
# without a `dim`, `log_softmax` picks dim 0 for 3-d input, the batch, with only
# a deprecation warning
# {✓ test_log_softmax_without_dim_normalises_over_the_batch_for_3d_input}.
# `.float()` comes before the division {✓
# test_headline_block_matches_float64_for_half_precision_logits_at_32k}: bfloat16
# logits divided by $T$ and normalised in bfloat16 give a loss off by percents
# {✓ test_headline_block_without_float_is_off_by_percents_in_bfloat16}. The
# factor $T^2$ is not decoration: without it the gradient shrinks as $1/T^2$ once
# $T$ is large {✓ test_without_t_squared_the_gradient_shrinks_as_one_over_t_squared},
# so every change of $T$ would silently rescale the distillation term.
#
# On this page you will write the loss two equivalent ways, combine it with the
# cross-entropy on labels, measure its gradient against temperature, average it
# over the real tokens of a padded language-model batch, and see which choices
# distilling a language model adds.
#
# [Hinton et al., 2015]: https://arxiv.org/abs/1503.02531

# %% [markdown]
# ## The loss
#
# `"batchmean"` divides by the batch size: one KL per example, averaged, as long as
# the logits are (batch, classes)
# {✓ test_loss_is_t_squared_times_the_mean_kl_per_example}. The teacher can be
# given as probabilities or, better, as log-probabilities with `log_target=True`
# {✓ test_teacher_as_probabilities_or_log_probabilities_gives_the_same_loss}; it
# is a fixed target, so its logits are detached (compute them under
# `torch.no_grad()` in training) {✓ test_teacher_gets_no_gradient}. The
# logits are cast to at least float32 before they are divided by $T$: in bfloat16
# or float16 the quotient is rounded (it is exact only when $T$ is a power of 2)
# {✓ test_logits_are_cast_to_float32_before_they_are_divided_by_t}, and
# that costs the loss digits
# {✓ test_rounding_the_quotient_in_half_precision_costs_the_loss_digits}.
#
# Hinton and colleagues (§2) combine it with the cross-entropy on the hard labels,
# and found the best results "by using a considerably lower weight on the second
# objective function", the hard labels. Below, that cross-entropy is taken at
# temperature 1, with a lower weight than the soft targets'
# {✓ test_hard_label_weight_is_lower_than_the_soft_target_weight}; the weight
# itself is a hyperparameter (`HARD_LABEL_WEIGHT`).

# %%
import torch
import torch.nn.functional as F

SEED = 0
generator = torch.Generator().manual_seed(SEED)
batch_size, n_classes = 32, 100
student_logits = 2 * torch.randn(batch_size, n_classes, generator=generator)
teacher_logits = 2 * torch.randn(batch_size, n_classes, generator=generator)
labels = torch.randint(n_classes, (batch_size,), generator=generator)


def distillation_loss(student_logits, teacher_logits, temperature, scale=True):
    """T² · KL(teacher_T ‖ student_T), averaged over the rows (the first dim)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: both models need one tokenizer; "
            "cut padded vocabulary columns with [..., :vocab_size]"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl * temperature**2 if scale else kl


temperature = 4.0
with_log_target = distillation_loss(student_logits, teacher_logits, temperature)
with_probabilities = (
    F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
    )
    * temperature**2
)

HARD_LABEL_WEIGHT = 0.1  # lower than the soft targets' weight, as Hinton et al. advise
total_loss = (1 - HARD_LABEL_WEIGHT) * with_log_target + HARD_LABEL_WEIGHT * (
    F.cross_entropy(student_logits, labels)
)

# %% active="ipynb"
# print(f"T² KL, teacher as log-probabilities: {with_log_target:.6f}")
# print(f"T² KL, teacher as probabilities:     {with_probabilities:.6f}")
# print(f"with cross-entropy on the labels:    {total_loss:.6f}")

# %% [markdown]
# ## Why T²
#
# The gradient of $D_{\mathrm{KL}}(p_T\,\|\,q_T)$ with respect to a student logit is
# $\frac{1}{T}\,(q_{T,i} - p_{T,i})$ {✓ test_kl_gradient_is_q_minus_p_over_t_per_row}.
# For large $T$ the softened distributions
# differ by about $(d_i - \bar d)/(N T)$, with $d = z_s - z_t$ over $N$ classes, so
# the gradient falls as $1/T^2$
# {✓ test_without_t_squared_the_gradient_shrinks_as_one_over_t_squared} and the
# $T^2$-scaled one tends to a constant, $(d_i - \bar d)/N$ per example
# {✓ test_t_squared_scaled_gradient_tends_to_hintons_limit_on_the_page} (Hinton
# et al., eq. 4; divided by the batch size here, for `"batchmean"`).
# That limit is all $T^2$ promises: for the student near its teacher below, the
# scaled gradient still changes by more than a factor of 2 over $T \ge 1$ {✓
# test_the_scaled_gradient_is_not_within_a_factor_of_two_for_a_near_student}. At
# any $T$ the scaled gradient is $T\,(q_T - p_T)$, so it goes to 0 as $T \to 0$
# {✓ test_the_scaled_gradient_goes_to_zero_as_t_goes_to_zero}; where it
# turns scales with the logits (multiply them and $T$ by $c$, and it is multiplied
# by $c$) {✓ test_where_the_scaled_gradient_turns_scales_with_the_logits}: for
# this page's logits it falls below $T = 1$
# {✓ test_for_the_pages_logits_the_scaled_gradient_falls_below_t_1}, for logits
# of small spread it still rises well below $T = 1$
# {✓ test_for_logits_of_small_spread_the_scaled_gradient_rises_well_below_t_1}.
# Below, the page's random pair and a
# student near its teacher
# (teacher logits of standard deviation 5, the student's off by noise of standard
# deviation 1), each with its limit.

# %%
TEMPERATURES = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
near_teacher_logits = 5 * torch.randn(batch_size, n_classes, generator=generator)
near_student_logits = near_teacher_logits + torch.randn(
    batch_size, n_classes, generator=generator
)


def student_gradient(student_logits, teacher_logits, temperature, scale=True):
    """The distillation loss's gradient with respect to the student's logits."""
    logits = student_logits.clone().requires_grad_()
    loss = distillation_loss(logits, teacher_logits, temperature, scale=scale)
    (gradient,) = torch.autograd.grad(loss, logits)
    return gradient


def large_temperature_limit(student_logits, teacher_logits):
    """lim T² ∂KL_T/∂z_s = (d − mean d) / (N · rows), d = z_s − z_t (Hinton eq. 4)."""
    d = student_logits - teacher_logits
    rows, n = d.shape[0], d.shape[-1]
    return (d - d.mean(dim=-1, keepdim=True)) / (n * rows)


PAIRS = {
    "random pair": (student_logits, teacher_logits),
    "near teacher": (near_student_logits, near_teacher_logits),
}
plain_norms = [
    student_gradient(*PAIRS["random pair"], t, scale=False).norm().item()
    for t in TEMPERATURES
]
scaled_norms = {
    name: [student_gradient(*pair, t).norm().item() for t in TEMPERATURES]
    for name, pair in PAIRS.items()
}
limit_norms = {
    name: large_temperature_limit(*pair).norm().item() for name, pair in PAIRS.items()
}

# %% active="ipynb"
# print("T      | random pair: without T², with T² | near teacher: with T²")
# for i, t in enumerate(TEMPERATURES):
#     print(f"{t:>6} | {plain_norms[i]:.2e}, {scaled_norms['random pair'][i]:.4f}"
#           f"               | {scaled_norms['near teacher'][i]:.4f}")
# print(f"limit  |            {limit_norms['random pair']:.4f}"
#       f"               | {limit_norms['near teacher']:.4f}")

# %% active="ipynb" alt="Gradient norm against temperature, with and without T²"
# import matplotlib.pyplot as plt
#
# fig, ax = plt.subplots(figsize=(5, 3))
# ax.loglog(TEMPERATURES, plain_norms, "o-", label="KL, random pair")
# for i, name in enumerate(PAIRS):
#     ax.loglog(TEMPERATURES, scaled_norms[name], "o-", color=f"C{i + 1}",
#               label=f"T² · KL, {name}")
#     ax.axhline(limit_norms[name], color=f"C{i + 1}", ls="--", lw=1)
# ax.set(xlabel="temperature T", ylabel="gradient norm")
# ax.legend(fontsize=8)
# plt.show()

# %% [markdown]
# ## Language models: average over the real tokens
#
# For (batch, tokens, vocabulary) logits, `"batchmean"` divides by the batch only
# {✓ test_batchmean_on_3d_logits_divides_by_the_batch_only},
# and flattening to (batch · tokens, vocabulary) averages over every position,
# prompt and padding included
# {✓ test_page_masked_loss_is_the_mean_over_its_real_tokens}. Distil only the
# response tokens: select them with a boolean mask, which gives a (real tokens,
# vocabulary) table whose `"batchmean"` is the mean over real tokens
# {✓ test_masked_loss_is_the_mean_over_real_tokens} (see
# [reductions](reductions.py)). Selecting, rather than multiplying by the mask,
# keeps NaN or inf at padded positions out of the loss and of the logits' gradient
# {✓ test_masked_loss_ignores_prompt_and_padding_positions}. It does not keep it
# out of the parameters' gradients: NaN or inf hidden states at padded positions
# make the head's weight gradient NaN (0 · NaN in the matmul's backward) {✓
# test_garbage_hidden_states_at_padding_reach_the_heads_gradient_unless_selected}.
# Select `hidden[mask]` before the head, or replace them with `torch.where` first
# {✓
# test_garbage_hidden_states_at_padding_reach_the_heads_gradient_unless_selected}.

# %%
VOCAB_SIZE = 32_000  # a Llama-2-sized vocabulary
lm_batch, lm_tokens = 2, 16
lm_student = torch.randn(lm_batch, lm_tokens, VOCAB_SIZE, generator=generator)
lm_teacher = 2 * torch.randn(lm_batch, lm_tokens, VOCAB_SIZE, generator=generator)
prompt_lengths = torch.tensor([[4], [3]])
sequence_lengths = torch.tensor([[16], [8]])  # the second sequence is padded
position = torch.arange(lm_tokens)
response_mask = (position >= prompt_lengths) & (position < sequence_lengths)


def masked_distillation_loss(student_logits, teacher_logits, mask, temperature):
    """T² · KL(teacher_T ‖ student_T), averaged over the positions where mask holds."""
    return distillation_loss(student_logits[mask], teacher_logits[mask], temperature)


lm_loss = masked_distillation_loss(lm_student, lm_teacher, response_mask, 1.0)
lm_loss_flattened = distillation_loss(
    lm_student.flatten(0, 1), lm_teacher.flatten(0, 1), 1.0
)
kl_per_position = F.kl_div(
    F.log_softmax(lm_student, dim=-1),
    F.log_softmax(lm_teacher, dim=-1),
    reduction="none",
    log_target=True,
).sum(dim=-1)
lm_loss_wrong_count = (kl_per_position * response_mask).sum() / response_mask.numel()

# %% active="ipynb"
# print(f"real tokens: {int(response_mask.sum())} of {response_mask.numel()}")
# print(f"mean over the real tokens:               {lm_loss:.4f}")
# print(f"flattened, prompt and padding included:  {lm_loss_flattened:.4f}")
# print(f"masked sum / all positions:              {lm_loss_wrong_count:.4f}")

# %% [markdown]
# The flattened mean is near the right one here
# {✓ test_page_masked_loss_is_the_mean_over_its_real_tokens} only because these
# random logits are alike at every position; in a real batch, prompt and padding
# positions
# behave differently, and the value depends on whatever the models output there
# {✓ test_masked_loss_ignores_prompt_and_padding_positions}. Zeroing the masked
# terms but dividing by every position shrinks the loss by the fraction of real
# tokens {✓ test_masked_sum_over_all_positions_shrinks_by_the_real_token_fraction}.

# %% [markdown]
# ## Distilling a language model
#
# - **Direction.** This page minimises the forward KL, teacher first
#   {✓ test_loss_is_t_squared_times_the_mean_kl_per_example}:
#   mass-covering, the student spreads over everything the teacher allows
#   {✓ test_forward_reverse::test_forward_kl_fit_is_moment_matching_from_every_start}
#   (see [forward vs reverse KL](forward_reverse.py)). MiniLLM ([Gu et al., 2023])
#   minimises the reverse KL, student first, which is mode-seeking {✓
#   test_forward_reverse::
#   test_reverse_kl_fits_from_starts_reach_the_peak_on_their_side_with_kl_log_2},
#   over sequences the student samples, with a policy gradient; per token, the reverse
#   KL is the call with its arguments swapped, the gradient flowing through
#   `kl_div`'s target (below)
#   {✓ test_reverse_loss_is_kl_student_teacher_and_trains_the_student}. GKD
#   ([Agarwal et al., 2024]) uses a generalised Jensen-Shannon divergence and
#   on-policy samples from the student. In TRL's
#   `GKDTrainer` and Liger-Kernel's JSD loss, `beta` 0 is the forward KL and 1
#   the reverse KL (read from `trl/trainer/gkd_trainer.py` at commit a9fa292 and
#   `src/liger_kernel/ops/jsd.py` at ead96b6, lines 54–65; not run here).
# - **Temperature.** Language models are distilled at $T$ of 1 to 2 (TRL's GKD
#   loss runs at 1 at that commit, its `temperature` being the sampling one; the
#   DistilBERT training script's default is 2), where $T^2$ changes the weight by
#   a factor of 4 at most.
# - **Top-k teacher logits.** Stored offline, a teacher is often only its $k$
#   largest logits per token. Renormalised over those $k$, they give the KL to a
#   teacher that is zero elsewhere
#   {✓ test_top_k_loss_is_the_kl_to_the_renormalised_teacher}, another loss
#   (with $k$ the whole vocabulary, the full one)
#   {✓ test_top_k_with_k_equal_to_the_vocabulary_is_the_full_loss}: a student
#   equal to the teacher scores $-\log$(kept mass), not 0
#   {✓ test_top_k_loss_of_the_teacher_itself_is_minus_log_kept_mass}; only a
#   student with no mass outside the $k$ scores 0, so the loss pushes the
#   student's tail to 0 {✓
#   test_top_k_loss_is_0_only_without_a_tail_and_pushes_the_students_tail_down}.
#   Near the teacher it exceeds the full KL by about $-\log$(kept mass)
#   {✓ test_top_k_loss_exceeds_the_full_kl_by_about_minus_log_kept_mass}, more
#   than that KL itself for a student off by noise of standard deviation 0.1,
#   printed below {✓ test_near_the_page_teacher_the_top_k_gap_exceeds_the_full_kl}.
#   For a random student the gap is several times $-\log$(kept mass)
#   {✓ test_top_k_loss_exceeds_the_full_kl_by_about_minus_log_kept_mass} but
#   within 1% of its KL, as printed below
#   {✓ test_top_k_loss_is_close_to_the_full_loss_far_from_the_teacher}.
# - **One vocabulary.** Teacher and student must share the tokenizer: the loss
#   compares logit $i$ with logit $i$. Models pad their embedding table, so cut
#   both logits to the tokenizer's size, `logits[..., :vocab_size]`, before the
#   softmax; `distillation_loss` raises a `ValueError` when the shapes differ {✓
#   test_mismatched_vocabularies_raise_a_value_error_and_cutting_the_padding_fixes_it}.
#
# [Gu et al., 2023]: https://arxiv.org/abs/2306.08543
# [Agarwal et al., 2024]: https://arxiv.org/abs/2306.13649


# %%
def reverse_distillation_loss(student_logits, teacher_logits):
    """KL(student ‖ teacher) at T = 1, averaged over rows: the student is the target."""
    log_q = F.log_softmax(student_logits, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach(), dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


def top_k_teacher(teacher_logits, k, temperature=1.0):
    """The teacher's k largest log-probabilities, renormalised, and their token ids."""
    top_logits, token_ids = teacher_logits.topk(k, dim=-1)
    return F.log_softmax(top_logits / temperature, dim=-1), token_ids


def top_k_distillation_loss(student_logits, log_p_top, token_ids, temperature=1.0):
    """T² · KL(renormalised top-k teacher ‖ student), averaged over rows."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_q_top = log_q.gather(-1, token_ids)
    kl = (log_p_top.exp() * (log_p_top - log_q_top)).sum(dim=-1)
    return kl.mean() * temperature**2


TOP_K = 64
peaked_teacher = 4 * lm_teacher[response_mask]  # a confident teacher, real tokens
lm_student_tokens = lm_student[response_mask]
near_student_tokens = peaked_teacher + 0.1 * torch.randn(
    peaked_teacher.shape, generator=generator
)
log_p_top, top_ids = top_k_teacher(peaked_teacher, TOP_K)
top_k_mass = F.softmax(peaked_teacher, dim=-1).gather(-1, top_ids).sum(dim=-1)
top_k_at_teacher = -top_k_mass.log().mean()  # KL(renormalised ‖ teacher)
top_k_loss = top_k_distillation_loss(lm_student_tokens, log_p_top, top_ids)
full_loss = distillation_loss(lm_student_tokens, peaked_teacher, 1.0)
near_top_k_loss = top_k_distillation_loss(near_student_tokens, log_p_top, top_ids)
near_full_loss = distillation_loss(near_student_tokens, peaked_teacher, 1.0)
reverse_loss = reverse_distillation_loss(lm_student_tokens, peaked_teacher)

# %% active="ipynb"
# print(f"teacher mass in its top {TOP_K}: {top_k_mass.mean():.4f} on average;"
#       f" top-{TOP_K} loss of the teacher itself: {top_k_at_teacher:.4f}")
# print(f"forward KL, top-{TOP_K} / full teacher: random student {top_k_loss:.4f} /"
#       f" {full_loss:.4f}; near student {near_top_k_loss:.4f} / {near_full_loss:.4f}")
# print(f"reverse KL, random student: {reverse_loss:.4f}")

# %% [markdown]
# ## What to remember
#
# - Student first, in log space, with `dim=-1`: `"batchmean"` on (rows, classes)
#   logits {✓ test_loss_is_t_squared_times_the_mean_kl_per_example}; the teacher
#   detached {✓ test_teacher_gets_no_gradient}, as log-probabilities with
#   `log_target=True`
#   {✓ test_teacher_as_probabilities_or_log_probabilities_gives_the_same_loss};
#   half-precision logits cast before the division, `z_s.float() / T`
#   {✓ test_headline_block_matches_float64_for_half_precision_logits_at_32k}.
# - Multiply the KL by $T^2$: its gradient then tends to a constant as $T$ grows
#   {✓ test_t_squared_scaled_gradient_tends_to_a_constant_as_t_grows},
#   so the distillation term keeps its weight against the cross-entropy; weight
#   the hard labels lower than the soft targets
#   {✓ test_hard_label_weight_is_lower_than_the_soft_target_weight}.
# - For (batch, tokens, vocabulary) logits, select the real tokens,
#   `student_logits[mask]`, and average over them
#   {✓ test_masked_loss_is_the_mean_over_real_tokens}; select the hidden states
#   before the head if padding can hold NaN or inf {✓
#   test_garbage_hidden_states_at_padding_reach_the_heads_gradient_unless_selected}.
# - For language models choose the direction (forward, reverse, JSD), keep $T$
#   near 1, and share one vocabulary; top-k targets are another loss, not 0 at
#   the teacher {✓ test_top_k_loss_of_the_teacher_itself_is_minus_log_kept_mass}.
