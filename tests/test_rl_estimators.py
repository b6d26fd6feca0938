"""Claims of the page "KL estimators in RL fine-tuning"."""

import math

import pytest
import torch
from torch.testing import assert_close

from snippets import rl_estimators as page

NEAR, FAR = page.PAIRS.values()


@pytest.fixture(scope="module")
def measured():
    return {pair: page.sampled_estimates(page.q, p) for pair, p in page.PAIRS.items()}


def standard_error(values):
    return values.std() / math.sqrt(len(values))


def test_true_kl_of_the_pairs_is_0_005_and_0_5(measured):
    near, far = (true_kl for _, true_kl in measured.values())
    assert_close(near.item(), 0.005)
    assert_close(far.item(), 0.5)


def test_k1_and_k3_are_unbiased(measured):
    for samples, true_kl in measured.values():
        for name in ["k1", "k3"]:
            values = samples[name]
            assert abs(values.mean() - true_kl) < 4 * standard_error(values), name


def test_k2_is_biased_by_about_a_quarter_on_the_far_pair(measured):
    samples, true_kl = measured["far: p = N(1, 1)"]
    bias = samples["k2"].mean() - true_kl
    assert bias > 10 * standard_error(samples["k2"])
    assert_close((bias / true_kl).item(), 0.25, rtol=0, atol=0.02)


def test_k2_and_k3_are_never_negative_and_k1_can_be(measured):
    for samples, _ in measured.values():
        assert (samples["k2"] >= 0).all()
        assert (samples["k3"] >= 0).all()
        assert (samples["k1"] < 0).any()


def test_k3_spread_is_a_small_fraction_of_k1_spread_for_the_near_pair(measured):
    samples, _ = measured["near: p = N(0.1, 1)"]
    assert samples["k3"].std() < samples["k1"].std() / 10


def test_k3_variance_is_unbounded_when_p_variance_is_twice_q_variance_or_more():
    # E_q[r²] = ∫ p²/q is finite only if σ_p² < 2 σ_q²
    assert page.p_wide.scale**2 > 2 * page.q.scale**2
    spreads = page.spread_as_the_sample_grows(page.q, page.p_wide)
    assert max(spreads["k3"]) > 5 * spreads["k3"][0]  # keeps growing with n
    assert max(spreads["k1"]) < 1.1 * min(spreads["k1"])  # settles


def second_moment_of_ratio(sigma_p, half_width):
    """E_q[r²] = ∫ p²/q over [-half_width, half_width], q = N(0, 1), p = N(0, σ_p²)."""
    x = torch.linspace(-half_width, half_width, 400_001, dtype=torch.float64)
    log_integrand = 2 * page.gaussian(0.0, sigma_p).log_prob(x) - page.q.log_prob(x)
    return torch.trapezoid(log_integrand.exp(), x).item()


@pytest.mark.parametrize(("variance_p", "grows"), [(1.9, False), (2.0, True)])
def test_k3_variance_is_finite_only_below_twice_q_variance(variance_p, grows):
    narrow, wide = (second_moment_of_ratio(variance_p**0.5, w) for w in (40, 80))
    assert (wide > 1.9 * narrow) if grows else math.isclose(wide, narrow, rel_tol=1e-9)


def test_k3_stays_unbiased_when_its_variance_is_unbounded():
    samples, true_kl = page.sampled_estimates(page.q, page.p_wide)
    assert_close(samples["k3"].mean().item(), true_kl.item(), rtol=0.05, atol=0)


def test_tokens_are_drawn_from_the_policy_with_the_page_generator():
    first = page.tokens.clone()
    generator = torch.Generator().manual_seed(page.SEED)
    torch.randn(page.batch_size, page.seq_len, page.vocab_size, generator=generator)
    torch.randn(page.batch_size, page.seq_len, page.vocab_size, generator=generator)
    again = torch.multinomial(page.policy_probs, 1, generator=generator)
    assert torch.equal(again.view_as(first), first)


def test_rlhf_penalty_is_beta_k1_of_the_generated_tokens():
    log_pi = page.policy_logits.log_softmax(-1).gather(-1, page.tokens[..., None])
    log_ref = page.reference_logits.log_softmax(-1).gather(-1, page.tokens[..., None])
    k1 = (log_pi - log_ref).squeeze(-1)
    assert_close(page.kl_penalty, page.beta * k1)
    assert_close(page.rewards[:, :-1], -page.kl_penalty[:, :-1])
    assert_close(page.rewards[:, -1], page.task_reward - page.kl_penalty[:, -1])


def test_grpo_term_is_beta_k3_with_the_reference_over_the_policy():
    r = (page.log_ref - page.log_pi).exp()
    assert_close(
        page.grpo_kl_term, page.beta * ((r - 1) - r.log()), rtol=1e-5, atol=1e-7
    )
    assert (page.grpo_kl_term >= 0).all()


def test_expected_k3_loss_gradient_is_the_forward_kl_gradient():
    assert_close(page.grad_k3_loss, page.grad_forward_kl, rtol=1e-9, atol=1e-12)


def test_expected_k3_loss_gradient_is_not_the_reverse_kl_gradient():
    assert (page.grad_k3_loss - page.grad_reverse_kl).abs().max() > 1e-2


def test_expected_k1_loss_gradient_is_zero():
    assert_close(
        page.grad_k1_loss, torch.zeros_like(page.grad_k1_loss), rtol=0, atol=1e-15
    )
