"""Claims of the page "KL at vocabulary scale", checked on its own snippet."""

import math

import pytest
import torch
import torch.nn.functional as F
from copyable import run_inline
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Categorical, kl_divergence
from torch.testing import assert_close

from snippets import kl_at_scale as page

RECOMMENDED = [page.kl_div_from_logits, page.categorical_from_logits]

SUPPORTING_TESTS = {
    "test_recommended_calls_name_reduction_and_sum_per_row": (
        "checks the page's set-up: its helper kl_div_from_logits sums F.kl_div's "
        "terms per row, as reduction='sum' does over everything"
    ),
    "test_machine_epsilon_named_in_the_prose": (
        "guards the prose: the quoted torch.finfo(dtype).eps runs and is 2**-23 "
        "and 2**-52"
    ),
}

QUOTED_IN_PROSE = {
    "logits - logits.logsumexp(dim=-1, keepdim=True)": (
        "Categorical's normalisation, quoted from torch/distributions/categorical.py"
    ),
}


def float32_sum_tolerance(vocab):
    """Relative error of a float32 sum of `vocab` terms: grows like √vocab · eps."""
    return 4 * 2.0**-23 * max(vocab, 16) ** 0.5


def test_all_three_calls_agree_on_five_classes():
    for kl_call in page.KL_CALLS:
        value_error, gradient_error = page.errors[(5, kl_call.__name__)]
        assert value_error < 1e-6 and gradient_error < 1e-6, kl_call.__name__


def test_most_of_the_32k_vocabulary_lies_below_float32_eps():
    assert page.eps == torch.finfo(torch.float32).eps
    assert page.share_below_eps > 0.5


def test_probs_categorical_is_wrong_at_32k_in_value_and_more_in_gradient():
    value_error, gradient_error = page.errors[(32_000, "categorical_from_probs")]
    assert 0.1 < value_error < 1  # "a double-digit percentage"
    assert gradient_error > value_error and gradient_error > 0.5
    # "too small": below the float64 definition in every row
    by_probs = page.categorical_from_probs(*page.logits_vocab).double()
    assert (by_probs < page.kl_float64(*page.logits_vocab)).all()


@pytest.mark.parametrize(
    ("dtype", "tiny"), [(torch.float32, 1e-9), (torch.float64, 1e-17)]
)
def test_probs_categorical_takes_the_log_of_probabilities_clamped_to_eps(dtype, tiny):
    eps = torch.finfo(dtype).eps
    assert tiny < eps
    q = torch.tensor([1 - tiny, tiny], dtype=dtype, requires_grad=True)
    log_q = Categorical(probs=q).logits
    # raised to eps before the log, and below 1 - eps capped to it
    expected = torch.tensor([math.log1p(-eps), math.log(eps)], dtype=dtype)
    assert_close(log_q, expected, rtol=1e-6, atol=0)
    assert log_q[1] > math.log(tiny) + 1  # not the log of the probability itself
    # the clamp passes no gradient to the clamped entry
    (gradient,) = torch.autograd.grad(log_q[1], q)
    assert (gradient == 0).all()


def test_probs_categorical_kl_is_p_times_the_difference_of_clamped_logs():
    eps = torch.finfo(torch.float32).eps
    p = torch.tensor([0.5, 0.3, 0.2 - 1e-9, 1e-9])
    q = torch.tensor([0.25, 0.25, 0.5 - 1e-10, 1e-10])
    clamped_log_p = p.clamp(eps, 1 - eps).log()
    clamped_log_q = q.clamp(eps, 1 - eps).log()
    expected = (p * (clamped_log_p - clamped_log_q)).sum()
    by_probs = kl_divergence(Categorical(probs=p), Categorical(probs=q))
    assert_close(by_probs, expected, rtol=1e-6, atol=1e-7)


def test_logits_categorical_keeps_log_probabilities_far_below_log_eps():
    logits = torch.tensor([3.0, 0.0, -60.0, -90.0])
    log_probs = Categorical(logits=logits).logits
    expected = logits.double() - logits.double().logsumexp(dim=-1)
    assert math.log(torch.finfo(torch.float32).eps) > -16 > log_probs[2]
    assert_close(log_probs.double(), expected, rtol=1e-6, atol=0)


def test_probs_categorical_underestimates_below_eps_the_reviews_probe():
    p, q = torch.tensor([0.9, 0.1]), torch.tensor([1 - 1e-9, 1e-9])
    exact = 0.9 * math.log(0.9 / (1 - 1e-9)) + 0.1 * math.log(0.1 / 1e-9)
    by_probs = kl_divergence(Categorical(probs=p), Categorical(probs=q))
    by_logits = kl_divergence(Categorical(logits=p.log()), Categorical(logits=q.log()))
    assert_close(by_logits, torch.tensor(exact), rtol=1e-5, atol=0)
    assert by_probs < 0.8 * exact


def test_probs_categorical_renormalises_an_unnormalised_target_silently():
    p_unnormalised = torch.tensor([0.3, 0.1, 0.2])  # sums to 0.6
    q = torch.tensor([0.2, 0.3, 0.5])
    renormalised = p_unnormalised / p_unnormalised.sum()
    by_probs = kl_divergence(Categorical(probs=p_unnormalised), Categorical(probs=q))
    expected = (renormalised * (renormalised / q).log()).sum()
    assert_close(by_probs, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("vocab", [5, 32_000, 128_000])
@pytest.mark.parametrize("kl_call", RECOMMENDED, ids=lambda call: call.__name__)
def test_recommended_calls_match_float64_definition_in_value_and_gradient(
    kl_call, vocab, dtype
):
    generator = torch.Generator().manual_seed(vocab)
    logits_p, logits_q = (4 * torch.randn(2, 3, vocab, generator=generator)).to(dtype)
    value_error, gradient_error = page.errors_against_float64(
        kl_call, logits_p, logits_q
    )
    limit = 1e-12 if dtype == torch.float64 else float32_sum_tolerance(vocab)
    assert value_error < limit and gradient_error < limit


@settings(max_examples=20)
@given(
    vocab=st.integers(min_value=2, max_value=50_000),
    scale=st.floats(min_value=0.1, max_value=8.0),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_recommended_calls_agree_with_the_definition_over_sizes_and_scales(
    vocab, scale, seed
):
    generator = torch.Generator().manual_seed(seed)
    logits_p, logits_q = scale * torch.randn(2, 2, vocab, generator=generator)
    reference = page.kl_float64(logits_p, logits_q)
    for kl_call in RECOMMENDED:
        value = kl_call(logits_p, logits_q).double()
        limit = float32_sum_tolerance(vocab) * reference.abs() + 1e-6
        assert ((value - reference).abs() <= limit).all(), kl_call.__name__


def test_float32_exp_underflows_below_about_minus_104():
    smallest = torch.finfo(torch.float32).smallest_normal * 2.0**-23  # 2**-149
    assert smallest == 2.0**-149 and torch.tensor(smallest).item() == smallest
    log_half = math.log(smallest / 2)  # log 2**-150 = -103.97...
    assert -104 < log_half < -103.9
    # exp rounds to the nearest float32: 0 from half the smallest one down
    assert torch.tensor(log_half - 1e-3).exp() == 0
    assert torch.tensor(log_half + 1e-3).exp() == smallest
    assert torch.tensor(-103.5).exp() > 0  # so not "below -103"


def test_logits_categorical_is_infinite_once_q_underflows_where_p_does_not():
    assert page.log_q_farther[1] < -104 < page.log_p_far[1]
    assert page.log_q_farther[1].exp() == 0 < page.log_p_far[1].exp()
    assert page.kl_underflow_categorical == math.inf
    # the true value, ~1.35e-20: the definition in float64 from the same logits
    log_p = torch.tensor([0.0, -50.0], dtype=torch.float64).log_softmax(dim=-1)
    log_q = torch.tensor([0.0, -120.0], dtype=torch.float64).log_softmax(dim=-1)
    exact = (log_p.exp() * (log_p - log_q)).sum()
    assert page.kl_underflow_functional > 0
    assert_close(page.kl_underflow_functional.double(), exact, rtol=1e-5, atol=0)


def test_masked_logit_gives_infinity_in_both_recommended_calls():
    logits_p = torch.tensor([[1.0, 0.0, -1.0]])
    logits_q = torch.tensor([[1.0, 0.0, -torch.inf]])  # Q rules out class 2
    for kl_call in RECOMMENDED:
        assert kl_call(logits_p, logits_q).item() == math.inf, kl_call.__name__


def test_recommended_calls_name_reduction_and_sum_per_row():
    logits_p, logits_q = page.logits_small
    expected = F.kl_div(
        logits_q.log_softmax(dim=-1), logits_p.softmax(dim=-1), reduction="sum"
    )
    assert_close(page.kl_div_from_logits(logits_p, logits_q).sum(), expected)


def test_machine_epsilon_named_in_the_prose():
    assert run_inline("torch.finfo(dtype).eps", dtype=torch.float32) == 2.0**-23
    assert run_inline("torch.finfo(dtype).eps", dtype=torch.float64) == 2.0**-52
