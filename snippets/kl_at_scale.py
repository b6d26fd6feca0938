# %% [markdown]
# # KL at vocabulary scale: which call to trust
#
# Three calls compute $D_{\mathrm{KL}}(P\,\|\,Q)$ and agree on a handful of
# classes {✓ test_all_three_calls_agree_on_five_classes}. On a language model's
# vocabulary only two of them do: `F.kl_div` on `log_softmax` outputs, and
# `kl_divergence` on `Categorical` distributions built with `logits=`
# {✓ test_recommended_calls_match_float64_definition_in_value_and_gradient}.
# Built with `probs=`, `Categorical` clamps every probability below
# `torch.finfo(dtype).eps` up to it
# {✓ test_probs_categorical_takes_the_log_of_probabilities_clamped_to_eps}, and on
# 32,000 classes its KL is visibly too small and its gradient further off still
# {✓ test_probs_categorical_is_wrong_at_32k_in_value_and_more_in_gradient}.
#
# On this page you will:
#
# - measure each call against the definition in float64 and against the
#   closed-form gradient, on five classes and on 32,000;
# - see the one limit of `Categorical` built with `logits=`: a probability of $Q$
#   that underflows to 0.

# %% [markdown]
# ## Why probs= and logits= differ
#
# `Categorical` built with `probs=` renormalises the probabilities
# {✓ test_probs_categorical_renormalises_an_unnormalised_target_silently}, then
# clamps them to $[\varepsilon, 1 - \varepsilon]$ before taking their log, with
# $\varepsilon$ = `torch.finfo(dtype).eps` (`clamp_probs` in
# `torch/distributions/utils.py`)
# {✓ test_probs_categorical_takes_the_log_of_probabilities_clamped_to_eps}; the
# categorical rule in `torch/distributions/kl.py` multiplies $P$ by the difference
# of those logs
# {✓ test_probs_categorical_kl_is_p_times_the_difference_of_clamped_logs}.
# Every probability below $\varepsilon$ is raised to it, and the clamp passes no
# gradient there
# {✓ test_probs_categorical_takes_the_log_of_probabilities_clamped_to_eps}.
# Built with `logits=`, `Categorical` only normalises them
# (`logits - logits.logsumexp(dim=-1, keepdim=True)`) and keeps every
# log-probability
# {✓ test_logits_categorical_keeps_log_probabilities_far_below_log_eps}. Each
# call is measured below against the definition in float64 (value) and against its
# closed-form gradient
# $\partial D_{\mathrm{KL}} / \partial\,\mathrm{logits}_Q = Q - P$
# {✓ test_recommended_calls_match_float64_definition_in_value_and_gradient}, first
# on five classes, then on a peaked model over 32,000 classes.

# %%
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

SEED = 0


def kl_div_from_logits(logits_p, logits_q):
    """KL(P‖Q) of each row by F.kl_div: the model's log-probabilities first."""
    p = logits_p.softmax(dim=-1)
    return F.kl_div(logits_q.log_softmax(dim=-1), p, reduction="none").sum(dim=-1)


def categorical_from_logits(logits_p, logits_q):
    """KL(P‖Q) of each row by kl_divergence on Categorical(logits=...)."""
    return kl_divergence(Categorical(logits=logits_p), Categorical(logits=logits_q))


def categorical_from_probs(logits_p, logits_q):
    """KL(P‖Q) of each row by kl_divergence on Categorical(probs=...)."""
    p, q = logits_p.softmax(dim=-1), logits_q.softmax(dim=-1)
    return kl_divergence(Categorical(probs=p), Categorical(probs=q))


def kl_float64(logits_p, logits_q):
    """The reference: the definition in float64, from log-probabilities."""
    log_p = logits_p.double().log_softmax(dim=-1)
    log_q = logits_q.double().log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def errors_against_float64(kl_call, logits_p, logits_q):
    """Largest relative error of the rows' KL, and relative L2 error of the
    gradient of their sum with respect to logits_q, which is exactly Q - P."""
    logits_q = logits_q.detach().requires_grad_()
    kl = kl_call(logits_p, logits_q)
    (gradient,) = torch.autograd.grad(kl.sum(), logits_q)
    kl_reference = kl_float64(logits_p, logits_q.detach())
    q_64, p_64 = logits_q.detach().double(), logits_p.double()
    gradient_reference = q_64.softmax(dim=-1) - p_64.softmax(dim=-1)
    value_error = ((kl.detach().double() - kl_reference).abs() / kl_reference).max()
    gradient_error = (gradient.double() - gradient_reference).norm()
    return value_error.item(), (gradient_error / gradient_reference.norm()).item()


KL_CALLS = [kl_div_from_logits, categorical_from_logits, categorical_from_probs]
LOGIT_SCALE = 4  # a peaked model: most of a large vocabulary gets almost nothing
generator = torch.Generator().manual_seed(SEED)
logits_small = LOGIT_SCALE * torch.randn(2, 4, 5, generator=generator)
logits_vocab = LOGIT_SCALE * torch.randn(2, 4, 32_000, generator=generator)
errors = {
    (n_classes, kl_call.__name__): errors_against_float64(kl_call, *logits)
    for n_classes, logits in [(5, logits_small), (32_000, logits_vocab)]
    for kl_call in KL_CALLS
}
eps = torch.finfo(torch.float32).eps
share_below_eps = (logits_vocab[1].softmax(dim=-1) < eps).float().mean()

# %% active="ipynb"
# print(f"Q below eps = {eps:.2e}: {share_below_eps:.0%} of the 32,000 classes")
# print("classes  call                     KL rel. error   gradient rel. error")
# for (n_classes, name), (value_error, gradient_error) in errors.items():
#     print(f"{n_classes:>7}  {name:<23}  {value_error:13.1e}   {gradient_error:.1e}")

# %% [markdown]
# On five classes the three calls agree to float32 rounding
# {✓ test_all_three_calls_agree_on_five_classes}. On 32,000 classes the one built
# with `probs=` is off by a double-digit percentage in value and more in gradient
# (the table above)
# {✓ test_probs_categorical_is_wrong_at_32k_in_value_and_more_in_gradient}, while
# `F.kl_div` on `log_softmax` and `Categorical` built with `logits=` stay at
# rounding level
# {✓ test_recommended_calls_match_float64_definition_in_value_and_gradient}.
# Give `Categorical` logits or log-probabilities, never the probabilities of a
# large vocabulary.
#
# ## The one limit of logits=
#
# The categorical rule sets a term to $+\infty$ wherever $Q$'s probability, the
# `exp` of its log-probability, is exactly 0 and $P$'s is not
# {✓ test_logits_categorical_is_infinite_once_q_underflows_where_p_does_not}.
# In float32 that happens below a log-probability of about $-104$ (the log of
# $2^{-150}$, half the smallest positive float32)
# {✓ test_float32_exp_underflows_below_about_minus_104}, so a class that $Q$ puts
# at $-120$ and $P$ at $-50$ gives an infinite KL, where `F.kl_div`, which never
# exponentiates $\log Q$, returns the tiny true value
# {✓ test_logits_categorical_is_infinite_once_q_underflows_where_p_does_not}:

# %%
log_p_far = torch.tensor([0.0, -50.0]).log_softmax(dim=-1)
log_q_farther = torch.tensor([0.0, -120.0]).log_softmax(dim=-1)
kl_underflow_categorical = kl_divergence(
    Categorical(logits=log_p_far), Categorical(logits=log_q_farther)
)
kl_underflow_functional = F.kl_div(
    log_q_farther, log_p_far, reduction="sum", log_target=True
)

# %% active="ipynb"
# print(f"Categorical(logits=...): {kl_underflow_categorical}")
# print(f"F.kl_div, log_target:    {kl_underflow_functional:.2e}")

# %% [markdown]
# A masked logit ($-\infty$ in $Q$ where $P > 0$) gives $+\infty$ in both
# recommended calls, as the definition says
# {✓ test_masked_logit_gives_infinity_in_both_recommended_calls}; the limit above
# concerns finite log-probabilities only.
#
# ## What to remember
#
# - On a vocabulary, compute KL from logits:
#   `F.kl_div(logits_q.log_softmax(dim=-1), p, reduction="batchmean")`, the mean
#   KL per row {✓ test_kl_definition::test_headline_call_is_the_mean_kl_per_row},
#   or `kl_divergence` on `Categorical` built with `logits=`; both agree with the
#   float64 definition across vocabulary sizes and logit scales
#   {✓ test_recommended_calls_agree_with_the_definition_over_sizes_and_scales}.
# - `Categorical` built with `probs=` clamps probabilities below
#   `torch.finfo(dtype).eps`
#   {✓ test_probs_categorical_takes_the_log_of_probabilities_clamped_to_eps} and
#   renormalises them
#   {✓ test_probs_categorical_renormalises_an_unnormalised_target_silently}:
#   fine on a few classes {✓ test_all_three_calls_agree_on_five_classes}, wrong
#   in value and gradient on 32,000
#   {✓ test_probs_categorical_is_wrong_at_32k_in_value_and_more_in_gradient}.
# - `Categorical` built with `logits=` returns $+\infty$ once an `exp` of $Q$'s
#   log-probabilities underflows where $P$'s does not
#   {✓ test_logits_categorical_is_infinite_once_q_underflows_where_p_does_not};
#   `F.kl_div` with `log_target=True` does not
#   {✓ test_logits_categorical_is_infinite_once_q_underflows_where_p_does_not}.
