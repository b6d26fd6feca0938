"""Claims of the page "Analytic KL with torch.distributions"."""

import math

import pytest
import torch
from copyable import run_inline
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import (
    Distribution,
    Independent,
    Normal,
    kl_divergence,
    register_kl,
)
from torch.testing import assert_close

from snippets import analytic_kl as page

FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}


def test_normal_closed_form_matches_the_formula_for_every_pair_of_the_batch():
    assert page.normal_library.shape == (3,)
    assert_close(page.normal_library, page.normal_formula, **FLOAT64)


def test_categorical_closed_form_matches_the_definition():
    assert_close(page.categorical_library, page.categorical_formula, **FLOAT64)


def test_multivariate_normal_closed_form_matches_the_formula():
    assert_close(page.mvn_library, page.mvn_formula, rtol=1e-9, atol=1e-10)


def test_kl_divergence_takes_p_first():
    forward = kl_divergence(Normal(0.0, 1.0), Normal(1.0, 2.0))
    reverse = kl_divergence(Normal(1.0, 2.0), Normal(0.0, 1.0))
    # KL(N(0, 1)‖N(1, 2²)) = log 2 + (1 + 1) / (2 · 4) − ½
    assert_close(forward.item(), math.log(2) + 2 / 8 - 0.5)
    assert abs(forward - reverse) > 0.1


def test_unregistered_pair_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="No KL"):
        kl_divergence(Independent(Normal(0.0, torch.ones(3)), 1), Normal(0.0, 1.0))


def test_support_mismatch_gives_infinity_and_the_nested_direction_log_2():
    assert page.kl_wide_narrow.item() == math.inf
    assert_close(page.kl_narrow_wide.item(), math.log(2))


def test_vae_closed_form_matches_kl_divergence():
    assert_close(page.vae_kl_formula, page.vae_kl_library, **FLOAT64)


def test_independent_has_batch_and_event_shapes_and_one_kl_per_example():
    assert page.posterior_vector.batch_shape == (page.batch_size,)
    assert page.posterior_vector.event_shape == (page.latent_dim,)
    assert page.kl_per_example.shape == (page.batch_size,)
    assert_close(page.vae_kl_independent, page.vae_kl_formula, **FLOAT64)


@settings(max_examples=20)
@given(
    batch=st.integers(1, 64),
    latent=st.sampled_from([1, 16, 512]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_independent_kl_is_the_per_dimension_kl_summed_over_the_event(
    batch, latent, dtype, seed
):
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, latent, generator=generator, dtype=dtype)
    logvar = torch.randn(batch, latent, generator=generator, dtype=dtype)
    posterior = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    prior = Independent(Normal(torch.zeros_like(mu), 1.0), 1)
    kl = kl_divergence(posterior, prior)
    # reference: the closed form per dimension, in float64, summed over the event
    mu64, logvar64 = mu.double(), logvar.double()
    reference = (-0.5 * (1 + logvar64 - mu64**2 - logvar64.exp())).sum(dim=-1)
    assert kl.shape == (batch,)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(kl.double(), reference, rtol=tolerance, atol=tolerance)


def test_independent_against_a_plain_normal_raises_not_implemented():
    with pytest.raises(NotImplementedError):
        kl_divergence(page.posterior_vector, page.prior)


def test_normal_takes_the_standard_deviation_so_the_variance_gives_another_kl():
    assert abs(page.variance_as_scale - page.vae_kl_formula) > 1
    std = (0.5 * page.logvar).exp()
    assert_close(Normal(page.mu, std).variance, page.logvar.exp(), **FLOAT64)


def test_what_to_remember_vae_lines_run_as_written_and_agree():
    names = {"mu": page.mu, "logvar": page.logvar}
    per_example = run_inline(
        "-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=-1)", **names
    )
    bound = run_inline(
        "posterior = Independent(Normal(mu, (0.5 * logvar).exp()), 1)", **names
    )
    bound = run_inline(
        "prior = Independent(Normal(torch.zeros_like(mu), 1.0), 1)", **bound
    )
    library = run_inline("kl_divergence(posterior, prior)", **bound)
    assert_close(library, per_example, **FLOAT64)
    assert_close(library.mean(), page.vae_kl_formula, **FLOAT64)


def test_kl_divergence_p_q_in_the_prose_runs_as_written_p_first():
    p, q = Normal(0.0, 1.0), Normal(1.0, 2.0)
    # KL(N(0, 1)‖N(1, 2²)) = log 2 + (1 + 1) / (2 · 4) − ½
    expected = math.log(2) + 2 / 8 - 0.5
    assert_close(run_inline("kl_divergence(p, q)", p=p, q=q).item(), expected)
    assert_close(
        run_inline("torch.distributions.kl_divergence(p, q)", p=p, q=q),
        kl_divergence(p, q),
    )


def test_independent_with_another_number_of_event_dimensions_raises():
    base = Normal(torch.zeros(2, 3), 1.0)
    with pytest.raises(NotImplementedError):
        kl_divergence(Independent(base, 1), Independent(base, 2))
    # the same number of event dimensions is registered: the sum of the base's KLs
    other = Normal(torch.ones(2, 3), 2.0)
    summed = kl_divergence(base, other).sum(dim=(-2, -1))
    assert_close(kl_divergence(Independent(base, 2), Independent(other, 2)), summed)


def test_register_kl_gives_kl_divergence_the_formula_of_a_new_pair():
    class Coin(Distribution):
        """A distribution type of the test's own: no KL formula registered for it."""

        arg_constraints = {}

        def __init__(self, p):
            self.p = torch.as_tensor(p, dtype=torch.float64)
            super().__init__(validate_args=False)

    class BiasedCoin(Coin):
        """A subclass: the lookup follows the class hierarchy."""

    with pytest.raises(NotImplementedError):
        kl_divergence(Coin(0.5), Coin(0.25))

    @register_kl(Coin, Coin)
    def _kl_coin_coin(p, q):
        return p.p * (p.p / q.p).log() + (1 - p.p) * ((1 - p.p) / (1 - q.p)).log()

    try:
        # the definition for two outcomes, written out: 0.5 log 2 + 0.5 log(2/3)
        expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
        assert_close(kl_divergence(Coin(0.5), Coin(0.25)).item(), expected)
        assert_close(kl_divergence(BiasedCoin(0.5), Coin(0.25)).item(), expected)
    finally:  # leave torch's registry as it was
        del torch.distributions.kl._KL_REGISTRY[Coin, Coin]
        torch.distributions.kl._KL_MEMOIZE.clear()
