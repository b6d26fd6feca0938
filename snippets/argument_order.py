# %% [markdown]
# # Argument order: which KL does F.kl_div compute?
#
# `F.kl_div(input, target)` computes $D_{\mathrm{KL}}(P\,\|\,Q)$ with $P$ in
# `target` and $\log Q$ in `input`: the **model goes first, as log-probabilities**,
# the target second, as probabilities. So `F.kl_div(log_q, p)` is
# $D_{\mathrm{KL}}(P\,\|\,Q)$, the reverse of the order in the formula. Swapping
# the arguments silently computes the other divergence; passing probabilities where
# log-probabilities belong returns numbers that are simply wrong, never positive.
#
# On this page you will:
#
# - read what `F.kl_div` computes, from its source in PyTorch 2.13;
# - see what swapping the arguments and forgetting a `log` give, with numbers;
# - use `log_target=True` to keep both sides in log space, and `nn.KLDivLoss`,
#   the same computation as a module.

# %% [markdown]
# ## What the source says
#
# `torch.nn.functional.kl_div` checks no shapes and no values (only that the dtypes
# are floating point) and calls `torch.kl_div`, which since
# [PR #80334] is a composite of two formulas. With $x$ the `input` and $y$ the
# `target`, each element of the default form is computed as
# `xlogy(target, target) - target * input`, and with `log_target=True` as
# `exp(target) * (target - input)`:
#
# $$\ell(x, y) = y\,(\log y - x), \qquad \ell_{\log}(x, y) = e^{y}\,(y - x).$$
#
# Read $x = \log Q$ and $y = P$: the sum of $P\,(\log P - \log Q)$ is
# $D_{\mathrm{KL}}(P\,\|\,Q)$. The order mirrors the other losses in `torch.nn`
# (prediction first, target second). The mismatch with the formula was reported as
# a bug ([pytorch#57459]) and resolved as documentation: [PR #67443] added the note
# that the docs carry today.
#
# [PR #80334]: https://github.com/pytorch/pytorch/pull/80334
# [pytorch#57459]: https://github.com/pytorch/pytorch/issues/57459
# [PR #67443]: https://github.com/pytorch/pytorch/pull/67443

# %%
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

SEED = 0
generator = torch.Generator().manual_seed(SEED)

logits_p, logits_q = 2 * torch.randn(2, 4, 5, generator=generator)
p, log_p = logits_p.softmax(dim=-1), logits_p.log_softmax(dim=-1)  # target P
q, log_q = logits_q.softmax(dim=-1), logits_q.log_softmax(dim=-1)  # model Q


def kl_per_row(p, q):
    """KL(P‖Q) of each row, from the definition."""
    # KL(P‖Q) = Σ p (log p − log q); xlogy makes 0·log 0 = 0
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(dim=-1)


kl_pq = kl_per_row(p, q)  # four distributions, one KL each
kl_qp = kl_per_row(q, p)

# %% [markdown]
# ## The model first, in log space
#
# Four pairs of distributions over five classes, one per row. `reduction="none"`
# keeps every term; summing each row gives one divergence per pair.

# %%
kl_div_model_first = F.kl_div(log_q, p, reduction="none").sum(dim=-1)
kl_div_target_first = F.kl_div(log_p, q, reduction="none").sum(dim=-1)

# %% active="ipynb"
# print("KL(P‖Q) by definition:      ", kl_pq)
# print("F.kl_div(log_q, p):         ", kl_div_model_first)
# print("KL(Q‖P) by definition:      ", kl_qp)
# print("F.kl_div(log_p, q) swapped: ", kl_div_target_first)

# %% [markdown]
# `F.kl_div(log_q, p)` matches $D_{\mathrm{KL}}(P\,\|\,Q)$ row by row, and the
# swapped call matches $D_{\mathrm{KL}}(Q\,\|\,P)$, a different number in every row.
# Nothing warns you: both are valid divergences, just not the same one. Which one
# you want is a modelling decision (the forward KL covers all of $P$'s mass, the
# reverse KL locks onto a mode); the argument order is how you state it.

# %% [markdown]
# ## Probabilities where log-probabilities belong
#
# The `input` is read as $\log Q$ whatever you pass. Give it probabilities and each
# term becomes $P\,(\log P - Q)$: not a divergence at all, and never positive,
# since $\log P \le 0$ and $Q \ge 0$; each row sums to $-H(P) - \sum_x P(x) Q(x)$.
# Give the target as log-probabilities without saying so and it is read as
# probabilities: $\log$ of a negative number, NaN.

# %%
probabilities_as_input = F.kl_div(q, p, reduction="none").sum(dim=-1)
log_target_unannounced = F.kl_div(log_q, log_p, reduction="none").sum(dim=-1)

# %% active="ipynb"
# print("correct KL(P‖Q):            ", kl_pq)
# print("F.kl_div(q, p), no log:     ", probabilities_as_input)
# print("F.kl_div(log_q, log_p):     ", log_target_unannounced)

# %% [markdown]
# A target that does not sum to 1 is just as silent. This is the report in
# [pytorch#60928], run as posted: the model's output goes through `.log()` as it
# should, but the target's three entries add up to about 0.3, so the "divergence"
# comes out negative. `nn.KLDivLoss()` uses the default `reduction="mean"`, which
# also warns (silenced here, shown on [reductions](reductions.py)).
#
# [pytorch#60928]: https://github.com/pytorch/pytorch/issues/60928

# %%
output = torch.tensor([[0.1132, 0.5477, 0.3390]])
target = torch.tensor([[0.1541, 0.0511, 0.0947]])


def issue_60928_loss():
    """The loss exactly as reported: default reduction, unnormalised target."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "mean" warning, shown on reductions
        return nn.KLDivLoss()(output.log(), target)


# %% active="ipynb"
# print(f"target sums to {target.sum():.4f}")
# print(f"nn.KLDivLoss()(output.log(), target) = {issue_60928_loss():.4f}")

# %% [markdown]
# ## Both sides in log space: log_target=True
#
# With `log_target=True` the target is read as $\log P$ and each term is
# $e^{\log P}(\log P - \log Q)$. Prefer it whenever the target comes out of a
# `log_softmax`, as in distillation:
#
# - nothing goes from log space to probabilities and back: no `softmax` whose tiny
#   entries round to 0 only to be logged again;
# - the gradient with respect to the target stays finite where $P$ underflows to
#   0, while the default form's `xlogy(target, target)` gives NaN there
#   ([numerical pitfalls](numerical_pitfalls.py));
# - one caveat: an entry of $\log P$ that is exactly $-\infty$ (a masked logit)
#   gives $0 \cdot (-\infty)$ = NaN; the
#   [pitfalls page](numerical_pitfalls.py#masked-classes-on-both-sides) shows
#   the fix.

# %%
kl_log_target = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)

# %% active="ipynb"
# print("KL(P‖Q) by definition:              ", kl_pq)
# print("F.kl_div(log_q, log_p, log_target=True):", kl_log_target)

# %% [markdown]
# ## nn.KLDivLoss is the same computation
#
# The module stores `reduction` and `log_target` and calls `F.kl_div` in its
# `forward`, with the same order: `loss_fn(input, target)`, model first.

# %%
loss_fn = nn.KLDivLoss(reduction="batchmean", log_target=True)
kl_module = loss_fn(log_q, log_p)
kl_functional = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)

# %% active="ipynb"
# print(f"nn.KLDivLoss:  {kl_module:.6f}")
# print(f"F.kl_div:      {kl_functional:.6f}")
# print(f"mean KL(P‖Q):  {kl_pq.mean():.6f}")

# %% [markdown]
# ## What to remember
#
# - `F.kl_div(log_q, p)` = $D_{\mathrm{KL}}(P\,\|\,Q)$: the model's
#   log-probabilities first, the target second. Swap them and you get
#   $D_{\mathrm{KL}}(Q\,\|\,P)$ without a warning.
# - The input must be log-probabilities (`log_softmax`, not `softmax`); the target
#   probabilities that sum to 1, or log-probabilities with `log_target=True`.
#   Neither shapes nor values are checked: wrong inputs give wrong numbers, and
#   probabilities passed as the input give numbers that are never positive.
# - Prefer `log_target=True` with `log_softmax` outputs on both sides.
# - `nn.KLDivLoss()(input, target)` is `F.kl_div(input, target)`.
