"""Claims of the page "Cross-entropy and KL", checked on its own snippet."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from copyable import run_inline
from torch.testing import assert_close

from snippets import cross_entropy_kl as page

FLOAT32 = {"rtol": 1e-6, "atol": 1e-7}


def test_cross_entropy_is_entropy_plus_kl():
    assert_close(page.cross_entropy_pq, page.entropy_p + page.kl_pq, **FLOAT32)


def test_cross_entropy_and_kl_have_the_same_gradient():
    assert_close(page.grad_cross_entropy, page.grad_kl, **FLOAT32)


def test_cross_entropy_and_kl_losses_differ_by_the_entropy():
    difference = page.cross_entropy_loss - page.kl_loss
    assert_close(difference.detach(), page.entropy_p, **FLOAT32)
    assert page.entropy_p > 0.5  # a visible gap, not rounding


@pytest.mark.parametrize("n_classes", [5, 32_000])
def test_cross_entropy_mean_is_batchmean_kl_plus_mean_entropy(n_classes):
    results = page.batches[n_classes]
    assert results["cross-entropy"] == pytest.approx(
        results["batchmean KL + mean H(P)"], rel=1e-6
    )


@pytest.mark.parametrize("n_classes", [5, 32_000])
def test_kl_div_mean_gradient_is_smaller_by_the_number_of_classes(n_classes):
    results = page.batches[n_classes]
    assert results["gradient ratio"] == pytest.approx(n_classes, rel=1e-5)
    assert results['kl_div "mean"'] < results["cross-entropy"] / n_classes


def kl_float64_rows(logits_q, p):
    """KL(P‖Q) of each row in float64, from the formula."""
    p, log_q = p.double(), logits_q.double().log_softmax(dim=-1)
    return (torch.xlogy(p, p) - p * log_q).sum(dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_classes", [5, 32_000, 128_000])
def test_replacing_cross_entropy_by_batchmean_kl_keeps_the_gradient(n_classes, dtype):
    generator = torch.Generator().manual_seed(n_classes)
    logits_p, logits_q = 2 * torch.randn(2, 3, n_classes, generator=generator)
    p = logits_p.softmax(dim=-1).to(dtype)
    logits_q = logits_q.to(dtype).requires_grad_()
    cross_entropy = run_inline(
        'F.cross_entropy(logits_q, p, reduction="mean")', logits_q=logits_q, p=p
    )
    kl = run_inline(
        'F.kl_div(logits_q.log_softmax(dim=-1), p, reduction="batchmean")',
        logits_q=logits_q,
        p=p,
    )
    grad_cross_entropy, grad_kl = (
        torch.autograd.grad(loss, logits_q)[0].double() for loss in (cross_entropy, kl)
    )
    # reference: d/dlogits of the mean over rows of KL is (Q − P) / rows
    q_64 = logits_q.detach().double().softmax(dim=-1)
    reference = (q_64 - p.double()) / logits_q.shape[0]
    limit = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 keeps 8 bits
    for gradient in (grad_cross_entropy, grad_kl):
        relative = (gradient - reference).norm() / reference.norm()
        assert relative < limit
    expected = kl_float64_rows(logits_q.detach(), p).mean()
    assert_close(kl.double(), expected, rtol=limit, atol=1e-5)


def test_kldivloss_mean_is_the_modules_default_and_divides_by_classes_too():
    generator = torch.Generator().manual_seed(1)
    logits_p, logits_q = torch.randn(2, 4, 32_000, generator=generator)
    log_q, p = logits_q.log_softmax(dim=-1), logits_p.softmax(dim=-1)
    assert nn.KLDivLoss().reduction == "mean"
    module = run_inline('nn.KLDivLoss(reduction="mean")')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "mean" warning, tested on reductions
        value = module(log_q, p)
    batchmean = F.kl_div(log_q, p, reduction="batchmean")
    assert_close(value * 32_000, batchmean, rtol=1e-5, atol=0)
