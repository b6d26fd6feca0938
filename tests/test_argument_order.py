"""Claims of the page "Argument order", checked on its own snippet."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from snippets import argument_order as page

FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}


def test_source_formula_default_form():
    target = torch.cat([page.p[:, :-1], torch.zeros(4, 1)], dim=-1)  # with zeros
    expected = torch.xlogy(target, target) - target * page.log_q
    terms = F.kl_div(page.log_q, target, reduction="none")
    assert_close(terms, expected, **FLOAT32)
    assert (terms[:, -1] == 0).all()  # xlogy: 0 where the target is 0


def test_source_formula_log_target_form():
    expected = page.log_p.exp() * (page.log_p - page.log_q)
    terms = F.kl_div(page.log_q, page.log_p, reduction="none", log_target=True)
    assert_close(terms, expected, **FLOAT32)


def test_model_first_computes_kl_of_target_from_model():
    assert_close(page.kl_div_model_first, page.kl_pq, **FLOAT32)


def test_swapping_arguments_computes_reverse_kl():
    assert_close(page.kl_div_target_first, page.kl_qp, **FLOAT32)


def test_forward_and_reverse_kl_differ_in_every_row():
    assert ((page.kl_pq - page.kl_qp).abs() > 1e-2).all()


def test_swapping_arguments_raises_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.kl_div(page.log_p, page.q, reduction="sum")


def test_kl_div_checks_neither_shapes_nor_values_only_dtypes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.kl_div(page.log_q, -page.p, reduction="sum")  # negative "probabilities"
        F.kl_div(page.log_q, 3 * page.p, reduction="sum")  # rows summing to 3
        F.kl_div(page.log_q[:1], page.p, reduction="sum")  # (1, 5) against (4, 5)
    with pytest.raises(RuntimeError, match="Integral inputs not supported"):
        F.kl_div(page.log_q.long(), page.p.long(), reduction="sum")


def test_probabilities_as_input_give_minus_entropy_minus_overlap():
    entropy_p = -torch.xlogy(page.p, page.p).sum(dim=-1)
    expected = -entropy_p - (page.p * page.q).sum(dim=-1)
    assert_close(page.probabilities_as_input, expected, **FLOAT32)


def test_probabilities_as_input_are_never_positive():
    generator = torch.Generator().manual_seed(3)
    for scale in [0.1, 1.0, 5.0, 20.0]:
        logits_p, logits_q = scale * torch.randn(2, 1000, 5, generator=generator)
        p, q = logits_p.softmax(dim=-1), logits_q.softmax(dim=-1)
        assert (F.kl_div(q, p, reduction="none") <= 0).all()


def test_log_probabilities_as_target_without_log_target_give_nan():
    assert page.log_target_unannounced.isnan().all()


def test_issue_60928_target_does_not_sum_to_one():
    assert_close(page.target.sum(), torch.tensor(0.2999), atol=1e-4, rtol=0)


def test_issue_60928_loss_is_negative_as_reported():
    assert_close(page.issue_60928_loss(), torch.tensor(-0.0648), atol=5e-5, rtol=0)


def test_issue_60928_default_reduction_warns():
    with pytest.warns(UserWarning, match="batchmean"):
        nn.KLDivLoss()(page.output.log(), page.target)


def test_log_target_true_computes_the_same_kl():
    assert_close(page.kl_log_target, page.kl_pq, **FLOAT32)


def test_log_target_with_minus_infinity_in_log_p_gives_nan():
    log_p_masked = torch.tensor([0.0, -torch.inf])  # P = (1, 0)
    log_q = torch.tensor([0.5, 0.5]).log()
    terms = F.kl_div(log_q, log_p_masked, reduction="none", log_target=True)
    assert terms[1].isnan()


def test_kldivloss_module_is_the_functional_call():
    assert_close(page.kl_module, page.kl_functional, rtol=0, atol=0)
    assert_close(page.kl_module, page.kl_pq.mean(), **FLOAT32)
