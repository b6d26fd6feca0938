"""Claims of the page "A checked KL to copy": every refusal, and agreement."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from snippets import checked_kl as page
from snippets.checked_kl import checked_kl

FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}
log_p, log_q = page.log_p, page.log_q


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: checked_kl(log_p, log_q[0]), r"shape \(4, 5\).*expand_as"),
        (lambda: checked_kl(log_p.exp(), log_q), "positive entries.*log_softmax"),
        (lambda: checked_kl(page.logits_p, log_q), "positive entries"),
        (lambda: checked_kl(log_p, page.logits_q.log_softmax(0)), "does not normalise"),
        (lambda: checked_kl(log_p, log_q * float("nan")), "20 NaN"),
        (lambda: checked_kl(log_p, log_q, reduction="batchmean"), "reduction="),
        (lambda: checked_kl(log_p.long(), log_q.long()), "dtype torch.int64"),
        (lambda: checked_kl(log_p, log_q, dim=2), "dim=2 is not a dimension"),
        (lambda: checked_kl(log_p, log_q.masked_fill(log_q < -1, -torch.inf)), "sum"),
    ],
    ids=[
        "shapes differ",
        "probabilities",
        "logits",
        "not normalised",
        "nan",
        "reduction",
        "integers",
        "dim",
        "rows with lost mass",
    ],
)
def test_checked_kl_refuses_misuse_with_a_message_that_says_what_to_do(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("misuse", list(page.misuses))
def test_every_misuse_shown_on_the_page_is_refused(misuse):
    with pytest.raises(ValueError):
        page.misuses[misuse]()


def test_rounding_above_zero_within_tolerance_is_accepted():
    nudged = log_p + 1e-6 * (log_p == log_p.max(dim=-1, keepdim=True).values)
    assert checked_kl(nudged, log_q).isfinite()


def test_agrees_with_kl_div_batchmean():
    assert_close(page.kl_checked, page.kl_reference, **FLOAT32)


def test_gradient_agrees_with_kl_div():
    assert_close(page.grad_checked, page.grad_reference, **FLOAT32)


def test_reductions_none_and_sum():
    per_row = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)
    assert_close(checked_kl(log_p, log_q, reduction="none"), per_row, **FLOAT32)
    assert_close(checked_kl(log_p, log_q, reduction="sum"), per_row.sum(), **FLOAT32)


def test_dim_selects_the_dimension_that_holds_each_distribution():
    transposed = checked_kl(log_p.T, log_q.T, dim=0, reduction="none")
    assert_close(transposed, checked_kl(log_p, log_q, reduction="none"), **FLOAT32)


def test_agrees_with_kl_div_where_p_is_zero():
    log_p_zeros = log_p.masked_fill(page.masked, -torch.inf).log_softmax(dim=-1)
    expected = F.kl_div(log_q, log_p_zeros.exp(), reduction="batchmean")
    assert_close(checked_kl(log_p_zeros, log_q), expected, **FLOAT32)


def test_impossible_classes_leave_the_kl_of_the_remaining_ones():
    assert_close(page.kl_checked_masked, page.kl_visible_classes, **FLOAT32)


def test_kl_div_with_log_target_is_nan_on_impossible_classes():
    assert page.kl_div_masked.isnan()


def test_gradients_stay_finite_with_impossible_classes():
    assert page.grad_masked.isfinite().all()


def test_p_too_small_to_represent_against_q_zero_is_still_infinite():
    log_p_tiny = torch.tensor([0.0, -200.0]).log_softmax(dim=-1)  # exp() gives 0
    log_q_zero = torch.tensor([0.0, -torch.inf]).log_softmax(dim=-1)
    assert log_p_tiny.exp()[1] == 0
    assert checked_kl(log_p_tiny, log_q_zero).item() == math.inf


def test_q_zero_where_p_positive_gives_infinity():
    log_q_zeros = log_q.masked_fill(page.masked, -torch.inf).log_softmax(dim=-1)
    assert checked_kl(log_p, log_q_zeros).item() == math.inf
