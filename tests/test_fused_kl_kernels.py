"""Claims of the page "KL on GPUs: bfloat16, row chunks and fused kernels"."""

import pytest
import torch
from copyable import run_inline
from torch.testing import assert_close

from snippets import fused_kl_kernels as page
from snippets import large_vocab

QUOTED_IN_PROSE = {
    "torch.zeros((BT, V), dtype=torch.float32)": (
        "quoted from Liger-Kernel's src/liger_kernel/ops/fused_linear_jsd.py, where "
        "BT and V are its token count and vocabulary size"
    ),
}


def test_plain_bfloat16_kl_div_computes_and_returns_bfloat16():
    # each step's result is bfloat16: the log-softmax, the terms, their sum
    assert page.student.log_softmax(dim=-1).dtype == torch.bfloat16
    assert page.kl_terms(page.student, page.teacher).dtype == torch.bfloat16
    assert page.bf16_results["F.kl_div in bfloat16"].dtype == torch.bfloat16
    assert page.bf16_results["F.kl_div in float32"].dtype == torch.float32


def bf16_rows(vocab_size, seed=page.SEED, rows=4):
    generator = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(rows, vocab_size, generator=generator)).bfloat16()
    teacher = (3 * torch.randn(rows, vocab_size, generator=generator)).bfloat16()
    return student, teacher


def kl_by_definition(student, teacher):
    """Mean over rows of Σ p (log p − log q) in float64, from the bf16 logits."""
    log_q = student.double().log_softmax(dim=-1)
    p = teacher.double().softmax(dim=-1)
    return (torch.xlogy(p, p) - p * log_q).sum(dim=-1).mean()


def gradient_by_formula(student, teacher):
    """(q − p) / rows in float64, rounded to bfloat16: the best bf16 answer."""
    q, p = student.double().softmax(dim=-1), teacher.double().softmax(dim=-1)
    return ((q - p) / student.shape[0]).bfloat16()


@pytest.mark.parametrize("vocab_size", page.VOCAB_SIZES.values())
def test_bfloat16_terms_summed_in_float64_lose_accuracy_that_float32_keeps(
    vocab_size,
):
    student, teacher = bf16_rows(vocab_size)
    exact = kl_by_definition(student, teacher)
    terms = page.kl_terms(student, teacher)
    assert terms.dtype == torch.bfloat16
    terms_error = page.relative_error(terms.double().sum() / len(student), exact)
    upcast_error = page.relative_error(
        page.mean_kl(student.float(), teacher.float()), exact
    )
    assert upcast_error < 1e-5
    assert terms_error > 2**-10  # several bfloat16 roundings' worth, in total
    assert terms_error > 100 * upcast_error


@pytest.mark.parametrize("vocab_size", page.VOCAB_SIZES.values())
def test_bfloat16_gradient_is_off_where_the_float32_upcast_differs_in_few_elements(
    vocab_size,
):
    student, teacher = bf16_rows(vocab_size)
    best = gradient_by_formula(student, teacher)
    in_bf16 = page.student_gradient(lambda s: page.mean_kl(s, teacher), student)
    upcast = page.student_gradient(
        lambda s: page.mean_kl(s.float(), teacher.float()), student
    )
    assert in_bf16.dtype == upcast.dtype == torch.bfloat16
    assert page.relative_error(upcast, best) < 1e-3
    # the upcast differs from the best in few elements; each is the exact value's
    # other bfloat16 neighbour (less than one spacing, 8 bits, from it), or sits
    # where q and p nearly cancel in the gradient (q - p) / rows
    assert (upcast != best).double().mean() < 1e-2
    q, p = student.double().softmax(dim=-1), teacher.double().softmax(dim=-1)
    exact = (q - p) / student.shape[0]
    _, exponent = torch.frexp(exact)
    spacing = torch.ldexp(torch.ones_like(exact), exponent - 8)
    beyond = (upcast.double() - exact).abs() >= spacing
    assert ((q - p).abs()[beyond] < 1e-3 * p[beyond]).all()
    assert page.relative_error(in_bf16, best) > 2**-9
    assert page.relative_error(in_bf16, best) > 10 * page.relative_error(upcast, best)


def test_bfloat16_result_is_at_best_the_exact_value_rounded_and_is_it_on_this_seed():
    in_bf16 = page.bf16_results["F.kl_div in bfloat16"]
    assert in_bf16.item() == page.exact_kl.bfloat16().item()  # hides the loss
    assert (
        page.bf16_errors["F.kl_div in bfloat16"]
        > 10 * page.bf16_errors["F.kl_div in float32"]
    )
    # over seeds, the returned number is often a step or more off the rounding,
    # and always ten times further from the float64 value than the float32 upcast
    differs = 0
    for seed in range(1, 9):
        student, teacher = bf16_rows(page.VOCAB_SIZES["Llama 3"], seed, rows=8)
        exact = kl_by_definition(student, teacher)
        result = page.mean_kl(student, teacher)
        rounding = (exact.bfloat16().double() - exact).abs()
        assert (result.double() - exact).abs() >= rounding
        differs += result.item() != exact.bfloat16().item()
        upcast = page.mean_kl(student.float(), teacher.float())
        error = page.relative_error(result, exact)
        assert error > 10 * page.relative_error(upcast, exact)
    assert differs >= 2


def test_page_values_are_those_the_prose_describes():
    assert_close(page.exact_kl, kl_by_definition(page.student, page.teacher))
    errors = page.bf16_errors
    assert errors["F.kl_div in float32"] < 1e-5
    assert page.bf16_terms_error > 2**-10
    assert page.bf16_terms_error > 100 * errors["F.kl_div in float32"]
    gradients = page.gradient_errors
    assert_close(
        page.exact_gradient,
        gradient_by_formula(page.student, page.teacher),
        rtol=0,
        atol=0,
    )
    assert gradients["computed in bfloat16"] > 10 * gradients["computed in float32"]


def test_chunked_kl_agrees_with_the_float32_upcast_on_bfloat16_logits():
    chunked = large_vocab.chunked_kl(page.student, page.teacher)
    assert chunked.dtype == torch.float32
    expected = page.bf16_results["F.kl_div in float32"]
    assert_close(chunked, expected, rtol=1e-5, atol=0)


def test_row_chunk_arithmetic_is_the_chunked_kls_default():
    assert page.CHUNK_VALUES == large_vocab.CHUNK_VALUES
    vocab_size = page.VOCAB_SIZES["Llama 3"]
    assert page.rows_per_chunk == large_vocab.default_chunk_size(vocab_size)
    rows = large_vocab.row_chunks(page.n_tokens, page.rows_per_chunk)
    assert page.n_chunks == len(rows)


def test_page_vocabularies_are_those_of_the_chunked_kl_page():
    assert page.VOCAB_SIZES == large_vocab.VOCAB_SIZES
    assert page.student.shape[-1] == page.VOCAB_SIZES["Llama 3"] == 128_256


def test_upcast_call_of_what_to_remember_runs_as_written():
    student = page.student[:2]
    log_q = run_inline("student.float().log_softmax(dim=-1)", student=student)
    assert log_q.dtype == torch.float32
    assert_close(log_q, student.double().log_softmax(dim=-1).float())
