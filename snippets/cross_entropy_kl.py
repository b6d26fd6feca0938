# %% [markdown]
# # Cross-entropy and KL: same gradient, different scale
#
# Can a cross-entropy loss against soft targets be replaced by a KL loss, or the
# other way round? Yes: $H(P, Q) = H(P) + D_{\mathrm{KL}}(P\,\|\,Q)$, and $H(P)$
# does not depend on the model, so both have the same gradient. But only with
# matching reductions: `F.cross_entropy` averages over the rows of a batch, like
# `F.kl_div` with `reduction="batchmean"`, while `F.kl_div` with
# `reduction="mean"` (its default) also divides by the number of classes. Swap
# cross-entropy for that default and every gradient shrinks by the vocabulary size.
#
# On this page you will:
#
# - check the decomposition and the shared gradient on one distribution;
# - see the reduction trap on a batch of five classes and on a 32,000-class
#   vocabulary, in loss and gradient.

# %% [markdown]
# ## Entropy plus divergence
#
# The cross-entropy $H(P, Q) = -\sum_x P(x) \log Q(x)$ splits into the entropy of
# the target and the divergence:
#
# $$H(P, Q) = H(P) + D_{\mathrm{KL}}(P\,\|\,Q), \qquad H(P) = -\sum_x P(x)\log P(x)$$
#
# `F.cross_entropy` accepts probabilities as its target and computes $H(P, Q)$ from
# the model's logits.

# %%
import warnings

import torch
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
# fit the forward KL. The loss values differ (by $H(P)$); the gradients with
# respect to the model do not:

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
# the summed cross-entropy by the number of rows $N$. `F.kl_div`'s
# `"batchmean"` divides by $N$ too, so the two differ by the mean entropy of the
# targets. `F.kl_div`'s `"mean"` divides by every element, $N \cdot C$ with $C$
# classes (and warns that it is not the KL; silenced here, see
# [reductions](reductions.py)). Its gradient is $C$ times smaller than the
# cross-entropy's.


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
# entropy, and the gradient ratio is the number of classes. With a vocabulary of
# 32,000, a training run that replaces `F.cross_entropy` by
# `nn.KLDivLoss(reduction="mean")`, which is also the module's default, takes
# steps 32,000 times smaller: it looks stalled, not broken.
#
# ## What to remember
#
# - Cross-entropy and KL differ by $H(P)$, a constant in the model: same gradients,
#   different loss values.
# - Replace `F.cross_entropy(logits_q, p, reduction="mean")` by
#   `F.kl_div(logits_q.log_softmax(dim=-1), p, reduction="batchmean")`, not by
#   `reduction="mean"`, which divides by the number of classes as well.
