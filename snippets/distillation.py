# %% [markdown]
# # Knowledge distillation: temperature and the T² factor
#
# A student learns from a teacher's *soft* targets: both distributions are softened
# by a temperature $T$, and the loss is
# $T^2 \cdot D_{\mathrm{KL}}\big(\mathrm{softmax}(z_t / T)\,\|\,\mathrm{softmax}(z_s /
# T)\big)$, averaged over the batch ([Hinton et al., 2015], who write it as the
# cross-entropy against the soft targets: the same gradient, since the two differ
# by the teacher's entropy, a constant). In PyTorch that is
# `F.kl_div(log_softmax(z_s / T), log_softmax(z_t / T), reduction="batchmean",
# log_target=True) * T**2`: student first, in log space. The factor $T^2$ is not
# decoration: without it the gradient shrinks as $1/T^2$, so every change of $T$
# would silently rescale the distillation term against the others.
#
# On this page you will write the loss two equivalent ways, combine it with the
# usual cross-entropy on labels, and measure the gradient with and without $T^2$.
#
# [Hinton et al., 2015]: https://arxiv.org/abs/1503.02531

# %% [markdown]
# ## The loss
#
# `"batchmean"` divides by the batch size: one KL per example, averaged, as long as
# the logits are (batch, classes). The teacher can be given as probabilities or,
# better, as log-probabilities with `log_target=True`; it is a fixed target, so its
# logits are detached.

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
    """T² · KL(teacher_T ‖ student_T), averaged over the batch."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)  # student
    log_p = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)  # teacher
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

# the usual combination with the hard labels, at temperature 1
alpha = 0.5
total_loss = alpha * with_log_target + (1 - alpha) * F.cross_entropy(
    student_logits, labels
)

# %% active="ipynb"
# print(f"T² KL, teacher as log-probabilities: {with_log_target:.6f}")
# print(f"T² KL, teacher as probabilities:     {with_probabilities:.6f}")
# print(f"with cross-entropy on the labels:    {total_loss:.6f}")

# %% [markdown]
# ## Why T²
#
# The gradient of $D_{\mathrm{KL}}(p_T\,\|\,q_T)$ with respect to a student logit is
# $\frac{1}{T}\,(q_{T,i} - p_{T,i})$, and for large $T$ the softened distributions
# differ by an amount of order $1/T$: the gradient falls as $1/T^2$. Multiplying by
# $T^2$ keeps its size within a factor of two whatever the temperature, and
# constant once $T$ is large.

# %%
TEMPERATURES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def student_gradient_norm(temperature, scale):
    """The norm of the distillation loss's gradient with respect to the student."""
    logits = student_logits.clone().requires_grad_()
    loss = distillation_loss(logits, teacher_logits, temperature, scale=scale)
    (gradient,) = torch.autograd.grad(loss, logits)
    return gradient.norm().item()


gradient_norms = {
    scale: [student_gradient_norm(t, scale) for t in TEMPERATURES]
    for scale in (False, True)
}

# %% active="ipynb"
# for t, plain, scaled in zip(TEMPERATURES, *gradient_norms.values()):
#     print(f"T = {t:>4}: gradient norm {plain:.2e} without T², {scaled:.4f} with T²")

# %% active="ipynb" alt="Gradient norm against temperature, with and without T²"
# import matplotlib.pyplot as plt
#
# fig, ax = plt.subplots(figsize=(5, 3))
# ax.loglog(TEMPERATURES, gradient_norms[False], "o-", label="KL")
# ax.loglog(TEMPERATURES, gradient_norms[True], "o-", label="T² · KL")
# ax.set(xlabel="temperature T", ylabel="gradient norm")
# ax.legend()
# plt.show()

# %% [markdown]
# ## What to remember
#
# - Student first, in log space, `"batchmean"` on (batch, classes) logits; the
#   teacher detached, as log-probabilities with `log_target=True`.
# - Multiply the KL by $T^2$, so that the distillation term keeps its weight
#   against the cross-entropy when you change $T$.
# - For (batch, tokens, vocabulary) logits, flatten to (batch · tokens, vocabulary)
#   first, or divide by the token count: see [reductions](reductions.py).
