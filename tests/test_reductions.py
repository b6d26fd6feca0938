"""Claims of the page "Reductions", checked on its own snippet."""

import inspect
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from snippets import reductions as page

FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}
SHAPES = [(5, 2), (10, 6, 4)]


def blog_sum(shape):
    return page.blog_example(shape, "sum")


def test_none_keeps_one_term_per_element():
    assert page.terms.shape == page.log_q.shape


def test_sum_adds_every_term():
    assert_close(page.kl_sum, page.terms.sum(), **FLOAT32)


def test_mean_divides_by_every_element():
    kl_mean, _ = page.kl_with_mean_reduction(page.log_q, page.log_p)
    assert_close(kl_mean, page.kl_sum / page.terms.numel(), **FLOAT32)


def test_mean_is_still_the_default_and_warns():
    assert inspect.signature(F.kl_div).parameters["reduction"].default == "mean"
    _, caught = page.kl_with_mean_reduction(page.log_q, page.log_p)
    assert any("'batchmean' divides only by the batch size" in text for text in caught)


def test_the_promised_change_did_not_come_with_major_release_2():
    _, caught = page.kl_with_mean_reduction(page.log_q, page.log_p)
    assert any("in the next major release" in text for text in caught)
    assert int(torch.__version__.split(".")[0]) >= 2


def test_mean_scales_gradients_down_by_the_number_of_classes():
    def grad_of(reduction):
        log_q = page.log_q.clone().requires_grad_()
        with pytest.warns(UserWarning) if reduction == "mean" else nullcontext():
            loss = F.kl_div(log_q, page.log_p, reduction=reduction, log_target=True)
        return torch.autograd.grad(loss, log_q)[0]

    n_classes = page.log_q.size(-1)
    assert_close(grad_of("mean"), grad_of("batchmean") / n_classes, **FLOAT32)


def test_the_wrapper_divides_the_sum_by_input_size_0_itself():
    source = inspect.getsource(F.kl_div)
    assert 'reduction_enum = _Reduction.get_enum("sum")' in source
    assert "reduced = reduced / input.size()[0]" in source


def test_mean_divides_by_the_terms_after_broadcasting():
    log_q = page.log_q.unsqueeze(1)  # (4, 1, 5) against (4, 5): 80 terms
    with pytest.warns(UserWarning):
        mean = F.kl_div(log_q, page.log_p, reduction="mean", log_target=True)
    total = F.kl_div(log_q, page.log_p, reduction="sum", log_target=True)
    assert_close(mean, total / 80, **FLOAT32)


def test_batchmean_divides_by_the_input_rows_when_the_target_has_more():
    assert page.one_model_row.size(0) == 1
    assert_close(page.broadcast_batchmean, page.broadcast_sum, **FLOAT32)


def test_batchmean_divides_by_input_size_0():
    assert_close(page.kl_batchmean, page.kl_sum / page.terms.size(0), **FLOAT32)


def test_batchmean_is_the_mean_kl_per_row_when_rows_are_distributions():
    assert_close(page.kl_batchmean, page.kl_per_row.mean(), **FLOAT32)


def test_language_model_batchmean_divides_by_batch_not_tokens():
    total = page.kl_per_token.sum()
    assert_close(page.lm_batchmean, total / page.batch_size, **FLOAT32)
    assert not torch.isclose(page.lm_batchmean, page.kl_per_token.mean())


def test_token_mean_divides_by_the_token_count():
    assert_close(page.lm_token_mean, page.kl_per_token.mean(), **FLOAT32)


def test_masked_token_mean_counts_only_real_tokens():
    real_tokens = page.kl_per_token[page.padding_mask]
    assert real_tokens.numel() == 5
    assert_close(page.lm_masked_token_mean, real_tokens.mean(), **FLOAT32)


def test_selecting_real_tokens_survives_a_nan_where_multiplying_does_not():
    poisoned = page.kl_per_token.masked_fill(~page.padding_mask, float("nan"))
    multiplied = (poisoned * page.padding_mask).sum() / page.padding_mask.sum()
    assert multiplied.isnan()
    assert_close(poisoned[page.padding_mask].mean(), page.lm_masked_token_mean)


def test_blog_softmax_over_dim_0_makes_each_column_a_distribution():
    torch.manual_seed(1)
    sample = page.Uniform(0.0, 10.0).sample((5, 2))
    column_sums = F.softmax(sample, dim=0).sum(dim=0)
    assert_close(column_sums, torch.ones(2), **FLOAT32)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_blog_reductions_divide_the_same_sum(shape):
    with pytest.warns(UserWarning):
        mean = page.blog_example(shape, "mean")
    batchmean = page.blog_example(shape, "batchmean")
    assert_close(mean, blog_sum(shape) / torch.Size(shape).numel(), **FLOAT32)
    assert_close(batchmean, blog_sum(shape) / shape[0], **FLOAT32)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_blog_batchmean_divides_by_outcomes_not_distributions(shape):
    n_distributions = torch.Size(shape[1:]).numel()
    mean_per_distribution = blog_sum(shape) / n_distributions
    assert shape[0] != n_distributions
    assert not torch.isclose(
        page.blog_example(shape, "batchmean"), mean_per_distribution
    )


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fixed_layout_batchmean_is_the_mean_kl_per_distribution(shape):
    n_distributions = torch.Size(shape[1:]).numel()
    expected = blog_sum(shape) / n_distributions
    assert_close(page.mean_kl_per_distribution(shape), expected, **FLOAT32)
