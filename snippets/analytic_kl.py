# %% [markdown]
# # Analytic KL with torch.distributions
#
# `torch.distributions.kl_divergence(p, q)` returns $D_{\mathrm{KL}}(p\,\|\,q)$ in
# closed form, in the order of the formula, for every pair of distribution types
# registered with `register_kl`; for any other pair it raises
# `NotImplementedError`, and you either register a formula of your own or fall back
# on a Monte Carlo estimate, unbiased, and differentiable when drawn with
# `rsample`.
#
# On this page you will:
#
# - check the closed forms for `Normal`, `Categorical` and `MultivariateNormal`
#   pairs against their formulas;
# - see what happens for an unregistered pair, and register one;
# - meet the infinite KL of a support mismatch;
# - estimate the KL by Monte Carlo, watch its error fall as $1/\sqrt{n}$, and
#   take its gradient;
# - write the KL term of a variational autoencoder and check it.

# %% [markdown]
# ## Closed forms for registered pairs
#
# For univariate Gaussians,
#
# $$D_{\mathrm{KL}}\big(\mathcal{N}(\mu_1, \sigma_1^2)\,\|\,\mathcal{N}(\mu_2,
# \sigma_2^2)\big) = \log\frac{\sigma_2}{\sigma_1}
# + \frac{\sigma_1^2 + (\mu_1 - \mu_2)^2}{2\sigma_2^2} - \frac12,$$
#
# and for $k$-dimensional ones with covariances $\Sigma_1$, $\Sigma_2$,
#
# $$D_{\mathrm{KL}} = \frac12\Big[\operatorname{tr}(\Sigma_2^{-1}\Sigma_1)
#   + (\mu_2 - \mu_1)^{\top}\Sigma_2^{-1}(\mu_2 - \mu_1) - k
#   + \log\frac{\det \Sigma_2}{\det \Sigma_1}\Big].$$
#
# `kl_divergence` works on batches: the distributions below hold three Gaussians
# each, and the result has one KL per pair.

# %%
import torch
from torch.distributions import (
    Categorical,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    Uniform,
    kl_divergence,
    register_kl,
)

SEED = 0
generator = torch.Generator().manual_seed(SEED)
DTYPE = torch.float64

mu_1, sigma_1 = torch.tensor([[0.0, 1.0, -2.0], [1.0, 2.0, 0.5]], dtype=DTYPE)
mu_2, sigma_2 = torch.tensor([[0.5, 1.0, 1.0], [1.5, 1.0, 3.0]], dtype=DTYPE)

# KL(N1‖N2) = log(σ2/σ1) + (σ1² + (μ1 − μ2)²) / (2σ2²) − ½
normal_formula = (
    torch.log(sigma_2 / sigma_1)
    + (sigma_1**2 + (mu_1 - mu_2) ** 2) / (2 * sigma_2**2)
    - 0.5
)
normal_library = kl_divergence(Normal(mu_1, sigma_1), Normal(mu_2, sigma_2))

p_probs = torch.tensor([0.7, 0.2, 0.1], dtype=DTYPE)
q_probs = torch.tensor([0.4, 0.4, 0.2], dtype=DTYPE)
categorical_formula = (p_probs * (p_probs / q_probs).log()).sum()
categorical_library = kl_divergence(
    Categorical(probs=p_probs), Categorical(probs=q_probs)
)


def random_covariance(k):
    """A well-conditioned covariance matrix: A Aᵀ + k·I."""
    a = torch.randn(k, k, generator=generator, dtype=DTYPE)
    return a @ a.T + k * torch.eye(k, dtype=DTYPE)


k = 4
mean_1, mean_2 = torch.randn(2, k, generator=generator, dtype=DTYPE)
cov_1, cov_2 = random_covariance(k), random_covariance(k)
difference = mean_2 - mean_1
cov_2_inverse = torch.linalg.inv(cov_2)
mvn_formula = 0.5 * (
    torch.trace(cov_2_inverse @ cov_1)
    + difference @ cov_2_inverse @ difference
    - k
    + torch.logdet(cov_2)
    - torch.logdet(cov_1)
)
mvn_library = kl_divergence(
    MultivariateNormal(mean_1, cov_1), MultivariateNormal(mean_2, cov_2)
)

# %% active="ipynb"
# print("Normal, formula:          ", normal_formula)
# print("Normal, kl_divergence:    ", normal_library)
# print(f"Categorical: formula {categorical_formula:.6f},"
#       f" kl_divergence {categorical_library:.6f}")
# print(f"MultivariateNormal (k=4): formula {mvn_formula:.6f},"
#       f" kl_divergence {mvn_library:.6f}")

# %% [markdown]
# ## Unregistered pairs, and registering your own
#
# There is no closed form for the KL between a Gaussian mixture and a Gaussian,
# and none is registered: `kl_divergence` looks the pair of *types* up in its
# registry and raises.

# %%
weights = Categorical(probs=torch.tensor([0.5, 0.5], dtype=DTYPE))
components = Normal(torch.tensor([-5.0, 10.0], dtype=DTYPE), torch.ones(2, dtype=DTYPE))
mixture = MixtureSameFamily(weights, components)  # ½ N(−5, 1) + ½ N(10, 1)
moment_matched = Normal(
    torch.tensor(2.5, dtype=DTYPE), torch.tensor(57.25, dtype=DTYPE).sqrt()
)


def kl_or_error(p, q):
    """kl_divergence(p, q), or the message of the error it raises."""
    try:
        return kl_divergence(p, q)
    except NotImplementedError as error:
        return f"NotImplementedError: {error}"


# %% active="ipynb"
# print(kl_or_error(mixture, moment_matched))

# %% [markdown]
# `register_kl(type_p, type_q)` adds a function for a pair of types. Registering it
# for `MixtureSameFamily` itself would change `kl_divergence` for every mixture in
# the program; a subclass keeps the change to the distributions you create with it.
# Here the function integrates numerically in log space (`log_prob` on a grid),
# which is exact enough for one dimension. The Gaussian here is the moment-matched
# one, $\mathcal{N}(2.5, 57.25)$, where the forward-KL fit of the
# [forward vs reverse KL](forward_reverse.py) page settles for this very mixture,
# and the value agrees with the forward KL that page computes there on its grid.


# %%
class GaussianMixture1d(MixtureSameFamily):
    """A one-dimensional Gaussian mixture, whose KL to a Normal we register.

    The registered function assumes Normal components and no batch dimensions.
    """


@register_kl(GaussianMixture1d, Normal)
def _kl_gaussian_mixture_normal(p, q):
    # KL(p‖q) = ∫ p (log p − log q) dx on a grid covering both, in log space
    centre, spread = q.loc, q.scale + p.component_distribution.scale.max()
    x = torch.linspace(-1, 1, 20_001, dtype=q.loc.dtype) * 12 * spread + centre
    log_p, log_q = p.log_prob(x), q.log_prob(x)
    return torch.trapezoid(log_p.exp() * (log_p - log_q), x)


registered_mixture = GaussianMixture1d(weights, components)
kl_mixture_normal = kl_divergence(registered_mixture, moment_matched)

# %% active="ipynb"
# print(f"KL(mixture‖N(2.5, 57.25)) = {kl_mixture_normal:.4f}")
# print("a plain MixtureSameFamily still raises:", kl_or_error(mixture, moment_matched))

# %% [markdown]
# ## Support mismatch: an infinite divergence
#
# If $p$ puts mass where $q$ has none, $D_{\mathrm{KL}}(p\,\|\,q) = +\infty$, and
# `kl_divergence` says so. The other way round is finite: $\mathrm{Uniform}(0, 1)$
# inside $\mathrm{Uniform}(0, 2)$ costs $\log 2$.

# %%
narrow, wide = Uniform(0.0, 1.0), Uniform(0.0, 2.0)
kl_wide_narrow = kl_divergence(wide, narrow)
kl_narrow_wide = kl_divergence(narrow, wide)

# %% active="ipynb"
# import math
#
# print(f"KL(U(0, 2)‖U(0, 1)) = {kl_wide_narrow}")
# print(f"KL(U(0, 1)‖U(0, 2)) = {kl_narrow_wide:.6f}   log 2 = {math.log(2):.6f}")

# %% [markdown]
# ## Monte Carlo, with rsample
#
# For any pair whose densities you can evaluate and $p$ you can sample,
# $D_{\mathrm{KL}}(p\,\|\,q) = \mathbb{E}_{x \sim p}[\log p(x) - \log q(x)]$: the
# average of $\log p - \log q$ over $n$ samples of $p$ is unbiased, and its
# standard error falls as $1/\sqrt{n}$. Drawn with `rsample` (the
# reparameterisation $x = \mu + \sigma \varepsilon$), the samples carry gradients,
# so the estimate can be trained through. Not every distribution has one
# (`has_rsample`): the mixture above has not, and `sample()` gives the same
# unbiased value without gradients. `rsample` takes no generator: seed the global
# one for repeatable draws.


# %%
def monte_carlo_kl(p, q, n_samples):
    """Unbiased, differentiable estimate of KL(p‖q) from n samples of p."""
    x = p.rsample((n_samples,))
    return (p.log_prob(x) - q.log_prob(x)).mean(dim=0)


p_normal = Normal(torch.tensor(0.0, dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE))
q_normal = Normal(torch.tensor(1.0, dtype=DTYPE), torch.tensor(2.0, dtype=DTYPE))
kl_exact = kl_divergence(p_normal, q_normal)
SAMPLE_SIZES = [10, 100, 1_000, 10_000]
N_REPEATS = 200  # independent estimates per sample size, to measure the error


def monte_carlo_errors():
    """RMS error of N_REPEATS independent estimates at each sample size."""
    torch.manual_seed(SEED)
    errors = []
    for n in SAMPLE_SIZES:
        x = p_normal.rsample((n, N_REPEATS))
        estimates = (p_normal.log_prob(x) - q_normal.log_prob(x)).mean(dim=0)
        errors.append((estimates - kl_exact).pow(2).mean().sqrt())
    return torch.stack(errors)


# %% active="ipynb"
# rms_errors = monte_carlo_errors()
# for n, error in zip(SAMPLE_SIZES, rms_errors):
#     print(f"n = {n:>6}: RMS error {error:.5f},  × √n = {error * math.sqrt(n):.3f}")

# %% active="ipynb" alt="RMS error of the Monte Carlo KL against the number of samples"
# import matplotlib.pyplot as plt
#
# fig, ax = plt.subplots(figsize=(5, 3))
# ax.loglog(SAMPLE_SIZES, rms_errors, "o-", label="RMS error of the estimate")
# reference = rms_errors[0] * math.sqrt(SAMPLE_SIZES[0])
# ax.loglog(SAMPLE_SIZES, [reference / math.sqrt(n) for n in SAMPLE_SIZES], "--",
#           label="∝ 1/√n")
# ax.set(xlabel="samples n", ylabel="error (nats)")
# ax.legend()
# plt.show()

# %% [markdown]
# The gradient flows through the samples: with respect to $p$'s mean it matches
# the gradient of the closed form, in expectation.


# %%
def gradients_of_mean(n_samples=100_000):
    """d KL / d mu of p, from the closed form and from a Monte Carlo estimate."""
    torch.manual_seed(SEED)
    mu = torch.tensor(0.0, dtype=DTYPE, requires_grad=True)
    p = Normal(mu, torch.tensor(1.0, dtype=DTYPE))
    (exact,) = torch.autograd.grad(kl_divergence(p, q_normal), mu)
    (estimated,) = torch.autograd.grad(monte_carlo_kl(p, q_normal, n_samples), mu)
    return exact, estimated


# %% active="ipynb"
# exact_gradient, estimated_gradient = gradients_of_mean()
# print(f"dKL/dmu: closed form {exact_gradient:.4f},"
#       f" Monte Carlo {estimated_gradient:.4f}")

# %% [markdown]
# ## The KL term of a variational autoencoder
#
# An encoder outputs a mean and a log-variance per latent dimension; the prior is
# $\mathcal{N}(0, I)$. With $\sigma^2 = e^{\text{logvar}}$ the closed form is
#
# $$D_{\mathrm{KL}}\big(\mathcal{N}(\mu, \sigma^2)\,\|\,\mathcal{N}(0, 1)\big)
#   = -\tfrac12\left(1 + \log\sigma^2 - \mu^2 - \sigma^2\right)$$
#
# per dimension, summed over the latent dimensions and averaged over the batch.

# %%
batch_size, latent_dim = 8, 16
mu = torch.randn(batch_size, latent_dim, generator=generator, dtype=DTYPE)
logvar = 0.5 * torch.randn(batch_size, latent_dim, generator=generator, dtype=DTYPE)

# KL(N(μ, σ²)‖N(0, 1)) = −½ (1 + log σ² − μ² − σ²), summed over dimensions
vae_kl_formula = (-0.5 * (1 + logvar - mu**2 - logvar.exp())).sum(dim=-1).mean()
posterior = Normal(mu, (0.5 * logvar).exp())  # scale = σ = exp(logvar / 2)
prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
vae_kl_library = kl_divergence(posterior, prior).sum(dim=-1).mean()

# %% active="ipynb"
# print(f"VAE KL, closed form:   {vae_kl_formula:.6f}")
# print(f"VAE KL, kl_divergence: {vae_kl_library:.6f}")

# %% [markdown]
# ## What to remember
#
# - `kl_divergence(p, q)` is $D_{\mathrm{KL}}(p\,\|\,q)$, $p$ first, closed form,
#   batched; it raises `NotImplementedError` for an unregistered pair of types.
# - Register your own formula with `register_kl`, on a subclass if you do not want
#   to change it for everyone.
# - A support mismatch is $+\infty$, and that is the right answer.
# - Monte Carlo with `rsample`: unbiased, differentiable, error $\propto 1/\sqrt{n}$.
# - VAE: `-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1).mean()`, or
#   `kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0, 1)).sum(-1).mean()`.
