# %% [markdown]
# # A checked KL to copy
#
# `F.kl_div` accepts anything and returns a number. The function below computes
# $D_{\mathrm{KL}}(P\,\|\,Q)$ between categorical distributions given as
# log-probabilities, averages over distributions (the reduction people usually
# mean), and refuses what cannot be right, with an error that says what is wrong
# and how to fix it: shapes that differ, probabilities or logits passed as
# log-probabilities, rows that do not sum to 1, NaN.
#
# On this page you will:
#
# - read the function (about 60 lines, no dependency beyond PyTorch);
# - see each refusal and its message;
# - check that on valid input it agrees with `F.kl_div`, zeros in $P$ included, and
#   that its gradients stay finite there.

# %% [markdown]
# ## The function
#
# Arguments follow the formula, **P first**: `checked_kl(log_p, log_q)` is
# $D_{\mathrm{KL}}(P\,\|\,Q)$, unlike `F.kl_div(log_q, log_p, log_target=True)`.
# Both are log-probabilities along `dim`; $-\infty$ marks an outcome that has
# probability 0. Where $P = 0$ the term is 0 whatever $Q$ is; where $P > 0$ and
# $Q = 0$ it is $+\infty$, as the definition says, even when $P$ is too small for
# its probability to be represented. The checks read the inputs a few more times
# and turn their results into Python booleans: cheap for a loss, but remove them
# from a loop where every pass over the data counts.

# %%
import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def checked_kl(log_p, log_q, dim=-1, reduction="mean", atol=1e-4):
    """KL(P‖Q) between categorical distributions given as log-probabilities.

    log_p, log_q: tensors of the same shape holding log P and log Q along ``dim``.
    reduction: "mean" over distributions (default), "sum", or "none" (one value per
    distribution, ``dim`` removed). atol: how far a row's total probability may be
    from 1, in log space. Raises ValueError for input that is not two matching
    sets of distributions.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; use one of {REDUCTIONS}")
    _check_same_shape(log_p, log_q)
    _check_log_probabilities("log_p", log_p, dim, atol)
    _check_log_probabilities("log_q", log_q, dim, atol)

    impossible = log_p == -torch.inf  # P(x) = 0: the term is 0, whatever Q says
    # KL(P‖Q) = Σ p (log p − log q); masking before the subtraction keeps
    # -inf (and NaN gradients) out where P(x) = 0
    log_ratio = log_p.masked_fill(impossible, 0) - log_q.masked_fill(impossible, 0)
    terms = log_p.exp() * log_ratio
    # P(x) > 0 and Q(x) = 0 is an infinite term, even if exp(log P) underflows
    terms = terms.masked_fill(~impossible & (log_q == -torch.inf), torch.inf)
    kl = terms.sum(dim=dim)
    return {"mean": kl.mean(), "sum": kl.sum(), "none": kl}[reduction]


def _check_same_shape(log_p, log_q):
    if log_p.shape != log_q.shape:
        raise ValueError(
            f"log_p has shape {tuple(log_p.shape)} but log_q has shape "
            f"{tuple(log_q.shape)}; F.kl_div would broadcast them without a word. "
            "Pass one Q per P; if comparing every P with the same Q is what you "
            "mean, say so with log_q.expand_as(log_p)."
        )


def _check_log_probabilities(name, log_probs, dim, atol):
    if not log_probs.is_floating_point():
        raise ValueError(f"{name} has dtype {log_probs.dtype}; pass floating point")
    if log_probs.dim() == 0 or not -log_probs.dim() <= dim < log_probs.dim():
        raise ValueError(
            f"dim={dim} is not a dimension of {name}, of shape "
            f"{tuple(log_probs.shape)}; pass the dim that holds each distribution"
        )
    n_nan = int(log_probs.isnan().sum())
    if n_nan:
        raise ValueError(
            f"{name} contains {n_nan} NaN value(s); the KL would be NaN. Find where "
            "they come from (log of a negative number, 0 * inf, an overflow) first."
        )
    largest = log_probs.max()
    if largest > atol:
        raise ValueError(
            f"{name} has positive entries (largest {largest:.4g}): it holds "
            "probabilities or logits, not log-probabilities. Pass "
            f"log_softmax(logits, dim={dim}) or probabilities.log()."
        )
    log_totals = torch.logsumexp(log_probs, dim=dim)
    if (log_totals.abs() > atol).any():
        lowest, highest = log_totals.min().exp(), log_totals.max().exp()
        raise ValueError(
            f"{name} does not normalise along dim={dim}: its probabilities sum to "
            f"between {lowest:.4g} and {highest:.4g} instead of 1. Normalise with "
            f"log_softmax(dim={dim}), or pass the dim that holds each distribution."
        )


# %% [markdown]
# ## What it refuses
#
# Each misuse below runs silently through `F.kl_div`; `checked_kl` stops it.

# %%
SEED = 0
generator = torch.Generator().manual_seed(SEED)
logits_p, logits_q = 2 * torch.randn(2, 4, 5, generator=generator)
log_p, log_q = logits_p.log_softmax(dim=-1), logits_q.log_softmax(dim=-1)

misuses = {
    "one Q for all rows, by accident": lambda: checked_kl(log_p, log_q[0]),
    "probabilities instead of log-probabilities": lambda: checked_kl(
        log_p.exp(), log_q
    ),
    "logits instead of log-probabilities": lambda: checked_kl(logits_p, log_q),
    "normalised over the wrong dim": lambda: checked_kl(
        logits_p.log_softmax(dim=0), log_q
    ),
    "a NaN from upstream": lambda: checked_kl(log_p, log_q.log()),
}

# %% active="ipynb"
# for misuse, call in misuses.items():
#     try:
#         call()
#     except ValueError as error:
#         print(f"{misuse}:\n    ValueError: {error}\n")

# %% [markdown]
# ## What it computes on valid input
#
# The same value as `F.kl_div` with `"batchmean"` on (rows, classes) tensors, and
# the same gradient with respect to the model's logits. With impossible outcomes
# ($-\infty$ in both $\log P$ and $\log Q$, a masked vocabulary) `F.kl_div` with
# `log_target=True` returns NaN, while `checked_kl` returns the divergence over
# the outcomes that remain, with finite gradients.

# %%
model_logits = logits_q.clone().requires_grad_()
kl_checked = checked_kl(log_p, model_logits.log_softmax(dim=-1))
(grad_checked,) = torch.autograd.grad(kl_checked, model_logits)

model_logits = logits_q.clone().requires_grad_()
kl_reference = F.kl_div(
    model_logits.log_softmax(dim=-1), log_p, reduction="batchmean", log_target=True
)
(grad_reference,) = torch.autograd.grad(kl_reference, model_logits)

masked = torch.zeros(4, 5, dtype=torch.bool)
masked[:, -2:] = True  # the last two classes are impossible for both P and Q
log_p_masked = logits_p.masked_fill(masked, -torch.inf).log_softmax(dim=-1)
masked_logits = logits_q.masked_fill(masked, -torch.inf).requires_grad_()
kl_checked_masked = checked_kl(log_p_masked, masked_logits.log_softmax(dim=-1))
(grad_masked,) = torch.autograd.grad(kl_checked_masked, masked_logits)
kl_div_masked = F.kl_div(
    log_q.masked_fill(masked, -torch.inf).log_softmax(dim=-1),
    log_p_masked,
    reduction="batchmean",
    log_target=True,
)
kl_visible_classes = checked_kl(
    logits_p[:, :3].log_softmax(dim=-1), logits_q[:, :3].log_softmax(dim=-1)
)

# %% active="ipynb"
# print(f"checked_kl:                     {kl_checked:.6f}")
# print(f"F.kl_div, 'batchmean':          {kl_reference:.6f}")
# print("largest gradient difference:   ", (grad_checked - grad_reference).abs().max())
# print(f"masked classes, checked_kl:     {kl_checked_masked:.6f}")
# print(f"the three visible classes only: {kl_visible_classes:.6f}")
# print(f"masked classes, F.kl_div:       {kl_div_masked}")
# print("gradients finite:              ", grad_masked.isfinite().all().item())

# %% [markdown]
# ## What to remember
#
# - Validate at the boundary: same shapes, log-probabilities (nothing positive),
#   rows that sum to 1 along the `dim` you mean, no NaN.
# - Handle $P = 0$ by masking *before* subtracting, so that neither the value nor
#   the gradient ever sees $0 \cdot (-\infty)$.
# - Return the mean over distributions, whatever the layout: the reduction people
#   mean when they write "the KL loss".
