# %% [markdown]
# # Reductions: what each one divides by
#
# `F.kl_div` computes one term per element {✓ test_none_keeps_one_term_per_element}
# and then reduces: `"sum"` adds them all {✓ test_sum_adds_every_term}, `"mean"`
# divides that sum by the number of elements, batch × classes
# {✓ test_mean_divides_by_every_element} (still the default in PyTorch 2.13, with a
# warning) {✓ test_mean_is_still_the_default_and_warns}, and `"batchmean"` divides
# it by `input.size(0)`, whatever the first dimension holds
# {✓ test_batchmean_divides_by_input_size_0}
# {✓ test_batchmean_divides_a_single_distribution_by_its_classes}. `"batchmean"` is
# the mean KL per distribution when the tensor is (distributions, classes) {✓
# test_batchmean_is_the_mean_kl_per_row_when_rows_are_distributions}; in other
# layouts it generally is not
# {✓ test_blog_batchmean_divides_by_outcomes_not_distributions}: one distribution
# of shape (C,) gets divided by C
# {✓ test_batchmean_divides_a_single_distribution_by_its_classes}. For
# language-model outputs of shape (B, T, V) it divides by B, not by the B·T tokens
# {✓ test_language_model_batchmean_divides_by_batch_not_tokens}.
#
# On this page you will:
#
# - check each reduction against the sum it divides, on tensors;
# - compute the per-token KL of a language model, with and without padding, with
#   gradients that stay finite when padded positions hold NaN;
# - rerun a well-known blog example and see why its `"batchmean"` is not a mean KL,
#   then fix its layout.

# %% [markdown]
# ## Four reductions of the same terms
#
# With $\ell$ the tensor of terms $P\,(\log P - \log Q)$, PyTorch's Python wrapper
# and its ATen kernel give:
#
# - `"none"`: $\ell$ itself, one term per element;
#   {✓ test_none_keeps_one_term_per_element}
# - `"sum"`: $\sum \ell$; {✓ test_sum_adds_every_term}
# - `"mean"`: $\sum \ell \,/\, N$, with $N$ the number of terms: `input.numel()`
#   when input and target have the same shape;
#   {✓ test_mean_divides_by_every_element}
# - `"batchmean"`: $\sum \ell \,/\, B$, with $B$ = `input.size(0)`
#   {✓ test_batchmean_divides_by_input_size_0}; the wrapper asks ATen for the sum
#   and divides by `input.size()[0]` itself
#   {✓ test_the_wrapper_divides_the_sum_by_input_size_0_itself}.
#
# Four rows of distributions over five classes: the distributions lie along the
# last dimension, so `"batchmean"` divides by the number of rows
# {✓ test_batchmean_divides_by_input_size_0}.

# %%
import warnings

import torch
import torch.nn.functional as F
from torch.distributions import Uniform

SEED = 0
generator = torch.Generator().manual_seed(SEED)

logits_p, logits_q = torch.randn(2, 4, 5, generator=generator)
log_p, log_q = logits_p.log_softmax(dim=-1), logits_q.log_softmax(dim=-1)

terms = F.kl_div(log_q, log_p, reduction="none", log_target=True)  # shape (4, 5)
kl_per_row = terms.sum(dim=-1)  # one KL(P‖Q) per row
kl_sum = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
kl_batchmean = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def kl_with_mean_reduction(log_q, log_p):
    """F.kl_div with reduction="mean", returning the value and the warning text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = F.kl_div(log_q, log_p, reduction="mean", log_target=True)
    return value, [str(warning.message) for warning in caught]


# %% active="ipynb"
# kl_mean, mean_warnings = kl_with_mean_reduction(log_q, log_p)
# print("KL(P‖Q) of each row:      ", kl_per_row)
# print(f"'sum'                     {kl_sum:.4f}")
# print(f"'mean'      (sum / {terms.numel()})    {kl_mean:.4f}")
# print(f"'batchmean' (sum / {terms.size(0)})     {kl_batchmean:.4f}")
# print(f"mean KL per row           {kl_per_row.mean():.4f}")
# print("warning of 'mean':", *mean_warnings)

# %% [markdown]
# `"batchmean"` equals the mean of the per-row divergences {✓
# test_batchmean_is_the_mean_kl_per_row_when_rows_are_distributions}; `"mean"` is
# that value divided again by the five classes {✓
# test_mean_is_exactly_c_times_smaller_than_batchmean_value_and_gradient}
# {✓ test_mean_times_the_classes_is_batchmean_on_rows_of_distributions}.
#
# !!! warning "The default reduction divides by the classes too"
#     On (rows, classes), a loss written with the default `"mean"` is exactly $C$
#     times smaller than `"batchmean"`, $C$ being the number of classes
#     {✓ test_mean_is_exactly_c_times_smaller_than_batchmean_value_and_gradient},
#     and so are its gradients
#     {✓ test_mean_scales_gradients_down_by_the_number_of_classes}. For a
#     language-model vocabulary that factor is the vocabulary size (the ratio at
#     32,000 classes is printed below)
#     {✓ test_the_page_prints_the_ratio_at_32k_classes}.
#     The warning says `"mean"` will behave like `"batchmean"` in the next major
#     release; PyTorch 2.0 was a major release and kept `"mean"` as it was
#     {✓ test_the_promised_change_did_not_come_with_major_release_2}. Name the
#     reduction you mean.

# %%
n_classes = 32_000  # as many as a language model's vocabulary
vocab_generator = torch.Generator().manual_seed(SEED)
log_p_vocab, log_q_vocab = torch.randn(
    2, 4, n_classes, generator=vocab_generator
).log_softmax(dim=-1)
kl_vocab_mean, _ = kl_with_mean_reduction(log_q_vocab, log_p_vocab)
kl_vocab_batchmean = F.kl_div(
    log_q_vocab, log_p_vocab, reduction="batchmean", log_target=True
)

# %% active="ipynb"
# print(f"4 rows x {n_classes} classes: 'batchmean' / 'mean' ="
#       f" {kl_vocab_batchmean / kl_vocab_mean:.1f}")

# %% [markdown]
# A single distribution of shape (C,) is not a batch of one: its `input.size(0)` is
# C, so `"batchmean"` divides its KL by the number of classes
# {✓ test_batchmean_divides_a_single_distribution_by_its_classes}. Use `"sum"` for
# one distribution, or give it a batch dimension with `unsqueeze(0)`
# {✓ test_sum_or_unsqueeze_0_give_the_kl_of_a_single_distribution}.

# %%
one_log_p, one_log_q = log_p[0], log_q[0]  # one distribution, shape (5,)
one_sum = F.kl_div(one_log_q, one_log_p, reduction="sum", log_target=True)
one_batchmean = F.kl_div(one_log_q, one_log_p, reduction="batchmean", log_target=True)
one_as_batch = F.kl_div(
    one_log_q.unsqueeze(0),
    one_log_p.unsqueeze(0),
    reduction="batchmean",
    log_target=True,
)

# %% active="ipynb"
# print(f"shape (5,):   'sum' {one_sum:.4f}, 'batchmean' {one_batchmean:.4f}")
# print(f"shape (1, 5): 'batchmean' {one_as_batch:.4f}")

# %% [markdown]
# Nothing checks that the input and the target have the same shape
# ([pitfalls](numerical_pitfalls.py#nothing-is-validated))
# {✓ test_numerical_pitfalls::test_mismatched_shapes_broadcast_without_a_warning}.
# Shapes that broadcast bend both divisors: `"mean"`
# divides by the number of terms *after* broadcasting
# {✓ test_mean_divides_by_the_terms_after_broadcasting}, `"batchmean"` still by the
# input's first dimension, even when the target has more rows
# {✓ test_batchmean_divides_by_the_input_rows_when_the_target_has_more}.

# %%
one_model_row = log_q[:1]  # shape (1, 5) against four target rows
broadcast_batchmean = F.kl_div(
    one_model_row, log_p, reduction="batchmean", log_target=True
)
broadcast_sum = F.kl_div(one_model_row, log_p, reduction="sum", log_target=True)

# %% active="ipynb"
# print(f"input (1, 5), target (4, 5): 'batchmean' {broadcast_batchmean:.4f},"
#       f" 'sum' {broadcast_sum:.4f}")

# %% [markdown]
# ## Language models: (B, T, V) and the token count
#
# A language model's log-probabilities have shape (batch B, sequence T, vocabulary
# V), one distribution per token along the last dimension. `"batchmean"` still
# divides by `input.size(0)` = B: the result is the KL *summed over the tokens of a
# sequence*, averaged over sequences
# {✓ test_language_model_batchmean_divides_by_batch_not_tokens_on_the_page}
# {✓ test_language_model_batchmean_divides_by_batch_not_tokens}. For the mean KL per
# token, divide the sum by the token count yourself
# {✓ test_token_mean_divides_by_the_token_count}, and with padding count only the
# real tokens {✓ test_masked_token_mean_counts_only_real_tokens_on_the_page}
# {✓ test_masked_token_mean_counts_only_real_tokens}.

# %%
batch_size, seq_len, vocab_size = 2, 3, 6
logits_teacher, logits_student = torch.randn(
    2, batch_size, seq_len, vocab_size, generator=generator
)
log_p_tokens = logits_teacher.log_softmax(dim=-1)
log_q_tokens = logits_student.log_softmax(dim=-1)
padding_mask = torch.tensor([[True, True, True], [True, True, False]])  # True: real

kl_per_token = F.kl_div(
    log_q_tokens, log_p_tokens, reduction="none", log_target=True
).sum(dim=-1)  # shape (B, T)
lm_batchmean = F.kl_div(
    log_q_tokens, log_p_tokens, reduction="batchmean", log_target=True
)
lm_token_mean = F.kl_div(
    log_q_tokens, log_p_tokens, reduction="sum", log_target=True
) / (batch_size * seq_len)
lm_masked_token_mean = kl_per_token[padding_mask].mean()  # padded tokens dropped

# %% active="ipynb"
# print("KL of each token:\n", kl_per_token)
# print(f"'batchmean' (sum / B = {batch_size}):          {lm_batchmean:.4f}")
# print(f"mean per token (sum / B·T = {batch_size * seq_len}):   {lm_token_mean:.4f}")
# n_real = int(padding_mask.sum())
# print(f"mean per real token ({n_real} of {padding_mask.numel()}):      "
#       f"{lm_masked_token_mean:.4f}")

# %% [markdown]
# ### Padding and NaN: select, and clean what comes from upstream
#
# Select the real tokens rather than multiply by the mask: a NaN at a padded
# position times 0 is still NaN
# {✓ test_selecting_real_tokens_survives_a_nan_where_multiplying_does_not}.
# Selection fixes the value, and the gradients too when the NaN is made inside the
# KL term (a padded target row of $-\infty$ log-probabilities: $0 \cdot (-\infty)$)
# {✓ test_selection_fixes_value_and_gradient_of_a_nan_made_inside_the_kl}. It does
# not fix a NaN that reaches the padded positions from upstream: the selected loss
# is finite, but the output layer's gradient sums over *every* position, padded
# ones included, and $0 \cdot \text{NaN}$ is NaN {✓
# test_selection_leaves_nan_gradients_from_an_upstream_nan_on_the_page}
# {✓ test_selection_leaves_nan_gradients_from_an_upstream_nan}. Such a NaN comes,
# for instance, from a hand-written attention whose row is fully masked: a
# `softmax` over scores that are all $-\infty$ is NaN
# {✓ test_softmax_over_a_fully_masked_attention_row_gives_nan}. Replacing the padded
# inputs with `torch.where` before the layer gives the real tokens' gradient,
# finite {✓ test_torch_where_on_the_padded_inputs_gives_finite_gradients_on_the_page}
# {✓ test_torch_where_on_the_padded_inputs_gives_the_real_tokens_gradient}: the
# same fix as for `torch.where` on the [pitfalls page][where-nan].
#
# [where-nan]: numerical_pitfalls.py#torchwhere-does-not-stop-nan-in-the-backward-pass


# %%
def token_kl(hidden, weight, log_p, padding_mask):
    """Mean KL per real token of a linear output layer; hidden is (B, T, H)."""
    log_q = (hidden @ weight).log_softmax(dim=-1)
    terms = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    return terms.sum(dim=-1)[padding_mask].mean()


hidden_size = 4
hidden = torch.randn(batch_size, seq_len, hidden_size, generator=generator)
weight = torch.randn(hidden_size, vocab_size, generator=generator, requires_grad=True)
hidden_nan = hidden.masked_fill(~padding_mask[..., None], torch.nan)  # from upstream

loss_nan_upstream = token_kl(hidden_nan, weight, log_p_tokens, padding_mask)
(grad_nan_upstream,) = torch.autograd.grad(loss_nan_upstream, weight)

hidden_clean = torch.where(padding_mask[..., None], hidden_nan, 0.0)
loss_cleaned = token_kl(hidden_clean, weight, log_p_tokens, padding_mask)
(grad_cleaned,) = torch.autograd.grad(loss_cleaned, weight)

# %% active="ipynb"
# terms_nan = kl_per_token.masked_fill(~padding_mask, torch.nan)
# multiplied = (terms_nan * padding_mask).sum() / padding_mask.sum()
# print(f"NaN at the pad, multiplied by the mask: {multiplied:.4f}")
# print(f"NaN at the pad, selected:               {terms_nan[padding_mask].mean():.4f}")
# print(f"NaN hidden state at the pad: loss {loss_nan_upstream:.4f},"
#       f" weight gradient has NaN: {grad_nan_upstream.isnan().any().item()}")
# print(f"after torch.where on the input:  loss {loss_cleaned:.4f},"
#       f" weight gradient has NaN: {grad_cleaned.isnan().any().item()}")

# %% [markdown]
# ## A well-known example, rerun
#
# An often-copied [blog post], as we read it, explains the reductions with two
# samples from $\mathrm{Uniform}(0, 10)$ of shape (5, 2), normalised with `softmax`
# and `log_softmax` over **dim 0**, and prints all four. Here it is with the seed
# we read there (the post seeds the global generator, so this cell does too), then
# again with shape (10, 6, 4).
#
# [blog post]: https://douglasrizzo.com.br/kl-div-pytorch/


# %%
def blog_example(shape, reduction):
    """The blog's set-up: softmax over dim 0 of Uniform(0, 10) samples."""
    torch.manual_seed(1)
    uniform = Uniform(0.0, 10.0)
    a, b = uniform.sample(shape), uniform.sample(shape)
    return F.kl_div(F.log_softmax(a, dim=0), F.softmax(b, dim=0), reduction=reduction)


# %% active="ipynb"
# print("shape (5, 2), 'none':\n", blog_example((5, 2), "none"))
# with warnings.catch_warnings():
#     warnings.simplefilter("ignore")  # the 'mean' warning, shown above
#     for shape in [(5, 2), (10, 6, 4)]:
#         for reduction in ["sum", "mean", "batchmean"]:
#             value = blog_example(shape, reduction)
#             print(f"shape {shape}, {reduction!r:>11}: {value:.4f}")

# %% [markdown]
# The numbers are right for what was asked {✓ test_blog_reductions_divide_the_same_sum},
# but `"batchmean"` is not the mean KL of anything in this layout
# {✓ test_blog_batchmean_divides_by_outcomes_not_distributions}.
# `F.softmax(b, dim=0)` makes each **column** a distribution: two distributions
# over five outcomes for shape (5, 2), 6 × 4 = 24 over ten outcomes for (10, 6, 4)
# {✓ test_blog_softmax_over_dim_0_makes_each_column_a_distribution}. `"batchmean"`
# divides by `input.size(0)`: by 5 and by 10, the number of *outcomes*
# {✓ test_blog_reductions_divide_the_same_sum}. The mean KL per distribution
# divides the same sum by 2 and by 24
# {✓ test_blog_batchmean_divides_by_outcomes_not_distributions}.
#
# The fix is the layout, not the reduction: put each distribution on the last
# dimension (`softmax(dim=-1)`) and flatten everything else into the first
# {✓ test_fixed_layout_batchmean_is_the_mean_kl_per_distribution}.


# %%
def mean_kl_per_distribution(shape):
    """The blog's tensors with distributions moved to the last dim, then batchmean."""
    torch.manual_seed(1)
    uniform = Uniform(0.0, 10.0)
    a, b = uniform.sample(shape), uniform.sample(shape)
    n_outcomes = shape[0]
    rows_a = a.movedim(0, -1).reshape(-1, n_outcomes)  # one distribution per row
    rows_b = b.movedim(0, -1).reshape(-1, n_outcomes)
    return F.kl_div(
        F.log_softmax(rows_a, dim=-1), F.softmax(rows_b, dim=-1), reduction="batchmean"
    )


# %% active="ipynb"
# for shape in [(5, 2), (10, 6, 4)]:
#     n_distributions = torch.Size(shape[1:]).numel()
#     print(
#         f"shape {shape}: sum / {n_distributions} distributions ="
#         f" {blog_example(shape, 'sum') / n_distributions:.4f},"
#         f" fixed layout with 'batchmean' = {mean_kl_per_distribution(shape):.4f}"
#     )

# %% [markdown]
# ## Which reduction, and when
#
# On the blog's (5, 2) example, where $N$ counts every element and $B$ is
# `input.size(0)`:

# %% active="ipynb" tags=["hide-input"]
# from IPython.display import Markdown
#
# with warnings.catch_warnings():
#     warnings.simplefilter("ignore")
#     values = {r: blog_example((5, 2), r) for r in ["sum", "mean", "batchmean"]}
# Markdown(
#     "| reduction | formula | value | when to use it |\n|---|---|---|---|\n"
#     "| `none` | $\\ell$, elementwise | a (5, 2) tensor |"
#     " per-token or per-class weighting, masking |\n"
#     f"| `sum` | $\\sum \\ell$ | {values['sum']:.4f} |"
#     " total KL, when you divide by your own count |\n"
#     f"| `mean` | $\\sum \\ell / N$ | {values['mean']:.4f} |"
#     " rarely: it also divides by the number of classes |\n"
#     f"| `batchmean` | $\\sum \\ell / B$ | {values['batchmean']:.4f} |"
#     " mean KL per distribution, if distributions are the rows of a 2-D tensor |\n"
# )

# %% [markdown]
# ## What to remember
#
# - Name the reduction: the default `"mean"` divides by batch × classes
#   {✓ test_mean_is_still_the_default_and_warns}
#   {✓ test_mean_divides_by_every_element}.
# - `"batchmean"` divides by `input.size(0)`
#   {✓ test_batchmean_divides_by_input_size_0}. It is the mean KL per distribution
#   when the tensor is (distributions, classes) {✓
#   test_batchmean_is_the_mean_kl_per_row_when_rows_are_distributions}; in other
#   layouts it generally is not
#   {✓ test_blog_batchmean_divides_by_outcomes_not_distributions}; a single
#   (C,) distribution gets divided by C
#   {✓ test_batchmean_divides_a_single_distribution_by_its_classes}: use `"sum"` for
#   it {✓ test_sum_or_unsqueeze_0_give_the_kl_of_a_single_distribution}.
# - The dimension that holds each distribution is yours to choose, through the
#   `dim` of `softmax` / `log_softmax`
#   {✓ test_blog_softmax_over_dim_0_makes_each_column_a_distribution}; keep it last.
# - For (B, T, V) language-model outputs, sum and divide by the number of real
#   tokens {✓ test_masked_token_mean_counts_only_real_tokens}. Selecting them with
#   the mask survives a NaN; multiplying by it does not
#   {✓ test_selecting_real_tokens_survives_a_nan_where_multiplying_does_not}. NaN
#   inputs at padded positions still make the gradients NaN
#   {✓ test_selection_leaves_nan_gradients_from_an_upstream_nan}; replacing them
#   with `torch.where` before the layer gives the real tokens' gradient
#   {✓ test_torch_where_on_the_padded_inputs_gives_the_real_tokens_gradient}.
