"""Claims of the page "Argument order", checked on its own snippet."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from snippets import argument_order as page

FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}


def test_source_formula_default_form():
    expected = torch.xlogy(page.p, page.p) - page.p * page.log_q
    assert_close(F.kl_div(page.log_q, page.p, reduction="none"), expected, **FLOAT32)


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


def test_probabilities_as_input_give_wrong_negative_values():
    assert (page.probabilities_as_input < 0).all()
    assert not torch.allclose(page.probabilities_as_input, page.kl_pq)


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
