# %% [markdown]
# # Cross-entropy and KL: same gradient, different scale
#
# Can a cross-entropy loss against soft targets be replaced by a KL loss, or the
# other way round? Yes: $H(P, Q) = H(P) + D_{\mathrm{KL}}(P\,\|\,Q)$
# {✓ test_cross_entropy_is_entropy_plus_kl}, and $H(P)$ does not depend on the
# model, so both have the same gradient
# {✓ test_cross_entropy_and_kl_have_the_same_gradient}. But only with matching
# reductions: `F.cross_entropy` averages over the rows of a batch, like `F.kl_div`
# with `reduction="batchmean"` {✓
# test_cross_entropy_default_mean_divides_the_summed_rows_by_their_number}
# {✓ test_cross_entropy_mean_is_batchmean_kl_plus_mean_entropy}, while `F.kl_div`
# with `reduction="mean"` (its default) also divides by the number of classes
# {✓ test_reductions::test_mean_is_still_the_default_and_warns}
# {✓ test_kl_div_mean_gradient_is_smaller_by_the_number_of_classes}. Swap
# cross-entropy for that default and every gradient shrinks by the vocabulary size.
# {✓ test_kl_div_mean_gradient_is_smaller_by_the_number_of_classes}
# {✓ test_reductions::
# test_mean_is_exactly_c_times_smaller_than_batchmean_value_and_gradient}
#
# On this page you will:
#
# - check the decomposition and the shared gradient on one distribution;
# - see the reduction trap on a batch of five classes and on a 32,000-class
#   vocabulary, in loss and gradient, and what it does to one SGD and one Adam step;
# - replace the cross-entropy on (batch, tokens, vocabulary) logits with a padding
#   mask, where the 2-D calls go wrong.

# %% [markdown]
# ## Entropy plus divergence
#
# The cross-entropy $H(P, Q) = -\sum_x P(x) \log Q(x)$ splits into the entropy of
# the target and the divergence {✓ test_cross_entropy_is_entropy_plus_kl}:
#
# $$H(P, Q) = H(P) + D_{\mathrm{KL}}(P\,\|\,Q), \qquad H(P) = -\sum_x P(x)\log P(x)$$
#
# `F.cross_entropy` accepts probabilities as its target and computes $H(P, Q)$ from
# the model's logits. {✓ test_cross_entropy_is_entropy_plus_kl} {✓
# test_cross_entropy_default_mean_divides_the_summed_rows_by_their_number}

# %%
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

SEED = 0

p = torch.tensor([0.7, 0.2, 0.1])
q = torch.tensor([0.4, 0.4, 0.2])

# H(P) = −Σ p log p; KL(P‖Q) = Σ p (log p − log q)
entropy_p = -torch.xlogy(p, p).sum()
kl_pq = (torch.xlogy(p, p) - torch.xlogy(p, q)).sum()
cross_entropy_pq = F.cross_entropy(q.log(), p)  # H(P, Q); log Q serves as logits

# %% active="ipynb"
# print(f"H(P, Q)            = {cross_entropy_pq:.6f}")
# print(f"H(P) + KL(P‖Q)     = {entropy_p + kl_pq:.6f}")

# %% [markdown]
# Minimising cross-entropy over $Q$ therefore *is* minimising
# $D_{\mathrm{KL}}(P\,\|\,Q)$, which is why classifiers trained with cross-entropy
# fit the forward KL {✓ test_cross_entropy_and_kl_have_the_same_gradient}. The
# loss values differ (by $H(P)$)
# {✓ test_cross_entropy_and_kl_losses_differ_by_the_entropy}; the gradients with
# respect to the model do not {✓ test_cross_entropy_and_kl_have_the_same_gradient}:

# %%
model_logits = torch.zeros(3, requires_grad=True)  # Q = softmax(model_logits)

cross_entropy_loss = F.cross_entropy(model_logits, p)
kl_loss = F.kl_div(F.log_softmax(model_logits, dim=-1), p, reduction="sum")
(grad_cross_entropy,) = torch.autograd.grad(cross_entropy_loss, model_logits)
(grad_kl,) = torch.autograd.grad(kl_loss, model_logits)

# %% active="ipynb"
# print(f"losses:  cross-entropy {cross_entropy_loss:.4f}   KL {kl_loss:.4f}")
# print("gradient of cross-entropy:", grad_cross_entropy)
# print("gradient of KL:           ", grad_kl)

# %% [markdown]
# ## The reduction trap on a batch
#
# With rows of distributions, `F.cross_entropy`'s default `reduction="mean"` divides
# the summed cross-entropy by the number of rows $N$. {✓
# test_cross_entropy_default_mean_divides_the_summed_rows_by_their_number}
# `F.kl_div`'s `"batchmean"` divides by $N$ too, so the two differ by the mean
# entropy of the targets.
# {✓ test_cross_entropy_mean_is_batchmean_kl_plus_mean_entropy} `F.kl_div`'s
# `"mean"` divides by every element, $N \cdot C$ with $C$ classes
# {✓ test_reductions::test_mean_divides_by_every_element} (and warns that it is
# not the KL; silenced here, see [reductions](reductions.py))
# {✓ test_reductions::test_mean_is_still_the_default_and_warns}. Its gradient is
# $C$ times smaller than the cross-entropy's.
# {✓ test_kl_div_mean_gradient_is_smaller_by_the_number_of_classes}


# %%
def losses_and_gradient_ratio(logits_q, p):
    """Cross-entropy ("mean"), KL ("batchmean" and "mean") of rows of logits
    against target rows, and how much larger the cross-entropy's gradient is."""
    logits_q = logits_q.detach().requires_grad_()
    log_q = logits_q.log_softmax(dim=-1)
    cross_entropy = F.cross_entropy(logits_q, p, reduction="mean")
    kl_batchmean = F.kl_div(log_q, p, reduction="batchmean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "mean" warns: it is not the mean KL
        kl_mean = F.kl_div(log_q, p, reduction="mean")
    (grad_cross_entropy,) = torch.autograd.grad(cross_entropy, logits_q)
    (grad_kl_mean,) = torch.autograd.grad(kl_mean, logits_q)
    mean_entropy = -torch.xlogy(p, p).sum(dim=-1).mean()
    return {
        "cross-entropy": cross_entropy.item(),
        "batchmean KL + mean H(P)": (kl_batchmean + mean_entropy).item(),
        'kl_div "mean"': kl_mean.item(),
        "gradient ratio": (grad_cross_entropy.norm() / grad_kl_mean.norm()).item(),
    }


generator = torch.Generator().manual_seed(SEED)
batches = {}
for n_classes in [5, 32_000]:
    logits_p, logits_q = 2 * torch.randn(2, 4, n_classes, generator=generator)
    batches[n_classes] = losses_and_gradient_ratio(logits_q, logits_p.softmax(dim=-1))

# %% active="ipynb"
# for n_classes, results in batches.items():
#     print(f"4 rows × {n_classes} classes")
#     for name, value in results.items():
#         print(f"  {name:<26}{value:12.6f}")

# %% [markdown]
# In both batches the cross-entropy equals the `"batchmean"` KL plus the mean
# entropy {✓ test_cross_entropy_mean_is_batchmean_kl_plus_mean_entropy}, and the
# gradient ratio is the number of classes.
# {✓ test_kl_div_mean_gradient_is_smaller_by_the_number_of_classes}
#
# ## What the smaller gradient does to training
#
# How much a run slows down depends on the optimizer. One step of a linear layer
# from 64 features to 32,000 classes, on 8 rows, trained once by `F.cross_entropy`
# and once by `nn.KLDivLoss(reduction="mean")`, which is also the module's default
# {✓ test_kldivloss_mean_is_the_modules_default_and_divides_by_classes_too}:

# %%
N_FEATURES, N_CLASSES, N_ROWS = 64, 32_000, 8


def loss_on_rows(loss_name, logits_q, p):
    """The cross-entropy, or the KL with the "mean" reduction, of rows of logits."""
    if loss_name == "cross-entropy":
        return F.cross_entropy(logits_q, p, reduction="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "mean" warns: it is not the mean KL
        return nn.KLDivLoss(reduction="mean")(logits_q.log_softmax(dim=-1), p)


def one_step(loss_name, make_optimizer):
    """Weight gradient and weight change of a seeded linear layer after one step."""
    torch.manual_seed(SEED)  # the same initial layer for every loss and optimizer
    layer = nn.Linear(N_FEATURES, N_CLASSES)
    generator = torch.Generator().manual_seed(SEED)
    features = torch.randn(N_ROWS, N_FEATURES, generator=generator)
    p = (2 * torch.randn(N_ROWS, N_CLASSES, generator=generator)).softmax(dim=-1)
    optimizer = make_optimizer(layer.parameters())
    weight_before = layer.weight.detach().clone()
    loss_on_rows(loss_name, layer(features), p).backward()
    optimizer.step()
    return layer.weight.grad, layer.weight.detach() - weight_before


ADAM_EPS = torch.optim.Adam([torch.zeros(1)]).defaults["eps"]  # added to |gradient|


def share(condition):
    """Fraction of the entries where a boolean tensor is True."""
    return condition.float().mean().item()


def compare_steps(make_optimizer):
    """How much larger the cross-entropy's step is, and what the KL's step does."""
    _, step_ce = one_step("cross-entropy", make_optimizer)
    grad_kl, step_kl = one_step('kl_div "mean"', make_optimizer)
    return {
        "cross-entropy step / KL step": (step_ce.norm() / step_kl.norm()).item(),
        "weights the KL step leaves unchanged": share(step_kl == 0),
        "KL gradients below Adam's eps": share(grad_kl.abs() < ADAM_EPS),
    }


optimizers = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.1),
    "Adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}
steps = {name: compare_steps(make) for name, make in optimizers.items()}

# %% active="ipynb"
# print(f"Adam's default eps: {ADAM_EPS:g}")
# for optimizer_name, results in steps.items():
#     print(optimizer_name)
#     for name, value in results.items():
#         shown = f"{value:.1f}" if name.endswith("step") else f"{value:.1%}"
#         print(f"  {name:<38}{shown:>8}")

# %% [markdown]
# The *gradients* are $C$ times smaller (the batches above).
# {✓ test_kl_div_mean_gradient_is_smaller_by_the_number_of_classes} With SGD the
# step is the learning rate times the gradient, so the step is $C$ times smaller
# too {✓ test_sgd_step_is_learning_rate_times_gradient_so_c_times_smaller}, and in
# float32 even smaller than that
# {✓ test_sgd_step_of_kl_mean_is_at_least_c_times_smaller_as_printed}: most of the
# KL's updates are below half the spacing between floats near the weights and round
# away {✓ test_kl_sgd_updates_below_half_the_float_spacing_round_away}, leaving
# most weights exactly as they were (printed under SGD).
# {✓ test_float32_sgd_step_of_kl_mean_leaves_most_weights_unchanged} The run looks
# stalled, not broken.
#
# Adam divides each step by a running estimate of the gradient's size, which
# cancels a constant scale, but it adds `eps` to that size first.
# {✓ test_adam_first_step_is_gradient_over_its_size_plus_eps} Most of the KL's
# gradients here lie below `eps` (printed under Adam), so its step is about ten
# times smaller than the cross-entropy's (printed), not $C$ times.
# {✓ test_adam_step_ratio_is_several_not_c_because_kl_gradients_are_below_eps} And
# Adam cancels the scale of the whole loss, not of one term: a KL that is added to
# other terms (an auxiliary loss, a regulariser) weighs $C$ times less against them
# than the cross-entropy did, whatever the optimizer.
# {✓ test_kl_mean_weighs_c_times_less_against_another_loss_term}
#
# ## Tokens: batch, tokens, vocabulary
#
# Everything above is for 2-D input, one row per distribution. A language model's
# logits have shape (batch, tokens, vocabulary), with a padding mask, and there the
# two calls disagree in where they look for the classes and what they divide by:
#
# - `F.cross_entropy` reads the classes from dim 1 (its documented input shape is
#   (N, C, d1, ...)), here the *tokens*
#   {✓ test_cross_entropy_on_3d_logits_takes_a_softmax_over_the_tokens}: with 3-D
#   input it takes a softmax over the tokens of each vocabulary entry, with no error
#   or warning;
#   {✓ test_cross_entropy_on_3d_logits_takes_a_softmax_over_the_tokens}
# - `F.kl_div` with `"batchmean"` sums over everything and divides by the size of
#   dim 0, the batch: the mean over tokens times the number of tokens, padding
#   included. {✓ test_batchmean_on_3d_divides_by_the_batch_and_counts_the_padding}
#
# The per-token mean over real tokens, computed both ways, agrees, in value (up to
# the entropy) {✓ test_page_masked_cross_entropy_is_masked_kl_plus_entropy}
# {✓ test_masked_per_token_kl_plus_entropy_is_the_masked_cross_entropy} and in
# gradient {✓ test_masked_per_token_kl_and_cross_entropy_have_the_same_gradient}:

# %%
generator = torch.Generator().manual_seed(SEED)
n_batch, n_tokens, n_vocab = 2, 5, 1000
logits_p, logits_q = 2 * torch.randn(2, n_batch, n_tokens, n_vocab, generator=generator)
logits_q.requires_grad_()
p, log_p = logits_p.softmax(dim=-1), logits_p.log_softmax(dim=-1)
log_q = logits_q.log_softmax(dim=-1)
lengths = torch.tensor([5, 3])
mask = torch.arange(n_tokens) < lengths[:, None]  # False on padding

# wrong: classes read from dim 1, here the tokens
cross_entropy_3d = F.cross_entropy(logits_q, p, reduction="none")
# right: one row per token, then the mean over the real tokens
cross_entropy_tokens = F.cross_entropy(
    logits_q.flatten(0, 1), p.flatten(0, 1), reduction="none"
).view(n_batch, n_tokens)
cross_entropy_masked = cross_entropy_tokens[mask].mean()
kl_tokens = F.kl_div(log_q, log_p, reduction="none", log_target=True)
kl_masked = kl_tokens.sum(dim=-1)[mask].mean()
entropy_masked = -torch.xlogy(p, p).sum(dim=-1)[mask].mean()
# wrong again: "batchmean" divides by the batch and counts the padding
kl_batchmean_3d = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)

(grad_cross_entropy_masked,) = torch.autograd.grad(
    cross_entropy_masked, logits_q, retain_graph=True
)
(grad_kl_masked,) = torch.autograd.grad(kl_masked, logits_q, retain_graph=True)

# %% active="ipynb"
# print(f"logits: {tuple(logits_q.shape)}, real tokens per row: {lengths.tolist()}")
# print(f"F.cross_entropy on 3-D, 'none': shape {tuple(cross_entropy_3d.shape)}")
# print(f"  its mean                      {cross_entropy_3d.mean():10.4f}")
# print(f"cross-entropy, masked per token {cross_entropy_masked:10.4f}")
# print(f"KL + entropy, masked per token  {kl_masked + entropy_masked:10.4f}")
# print(f"KL, masked per token            {kl_masked:10.4f}")
# print(f"KL 'batchmean' on 3-D           {kl_batchmean_3d:10.4f}")
# gap = (grad_cross_entropy_masked - grad_kl_masked).abs().max()
# print(f"largest gradient difference     {gap:10.2g}")

# %% [markdown]
# The 3-D cross-entropy has the shape (batch, vocabulary) and a value unrelated to
# the loss. {✓ test_cross_entropy_on_3d_logits_takes_a_softmax_over_the_tokens} The
# masked per-token cross-entropy equals the masked per-token KL plus the entropy
# {✓ test_page_masked_cross_entropy_is_masked_kl_plus_entropy}, with the same
# gradient {✓ test_masked_per_token_kl_and_cross_entropy_have_the_same_gradient}.
# The `"batchmean"` KL is far larger: it adds up the padding tokens and divides by
# the batch. {✓ test_batchmean_on_3d_divides_by_the_batch_and_counts_the_padding}
# Flattening to one row per token, or moving the vocabulary to dim 1 with
# `F.cross_entropy(logits_q.transpose(1, -1), p.transpose(1, -1), reduction="none")`,
# fixes the cross-entropy's classes
# {✓ test_transposed_cross_entropy_moves_the_vocabulary_to_dim_1}, but a flattened
# `"mean"` or `"batchmean"` still counts the padding
# {✓ test_flattened_mean_and_batchmean_still_count_the_padding}: select the real
# tokens with the mask first.
#
# ## What to remember
#
# - Cross-entropy and KL differ by $H(P)$, a constant in the model
#   {✓ test_cross_entropy_and_kl_losses_differ_by_the_entropy}: same gradients
#   {✓ test_cross_entropy_and_kl_have_the_same_gradient}, different loss values.
# - For 2-D input (rows, classes) only: replace
#   `F.cross_entropy(logits_q, p, reduction="mean")` by
#   `F.kl_div(logits_q.log_softmax(dim=-1), p, reduction="batchmean")`
#   {✓ test_replacing_cross_entropy_by_batchmean_kl_keeps_the_gradient}, not by
#   `reduction="mean"`, whose gradient is $C$ times smaller
#   {✓ test_kl_div_mean_gradient_is_smaller_by_the_number_of_classes} (with SGD, so
#   is every step {✓ test_sgd_step_is_learning_rate_times_gradient_so_c_times_smaller};
#   with Adam the KL still weighs $C$ times less against other loss terms
#   {✓ test_kl_mean_weighs_c_times_less_against_another_loss_term}).
# - For (batch, tokens, vocabulary) logits and a padding `mask` (True on real
#   tokens), take the mean over real tokens: with
#   `kl_tokens = F.kl_div(log_q, log_p, reduction="none", log_target=True)`, the
#   loss is `kl_tokens.sum(dim=-1)[mask].mean()`.
#   {✓ test_masked_per_token_kl_matches_the_formula_for_any_shape_and_mask}
#   {✓ test_masked_per_token_kl_plus_entropy_is_the_masked_cross_entropy} Do not
#   pass 3-D logits to `F.cross_entropy`: it reads the classes from dim 1.
#   {✓ test_cross_entropy_on_3d_logits_takes_a_softmax_over_the_tokens}
