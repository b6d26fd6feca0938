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
    assert page.bf16_results["F.kl_div in bfloat16"].dtype == torch.bfloat16
    assert page.bf16_results["F.kl_div in float32"].dtype == torch.float32


@pytest.mark.parametrize("vocab_size", page.VOCAB_SIZES.values())
def test_bfloat16_loses_accuracy_that_upcasting_to_float32_keeps(vocab_size):
    generator = torch.Generator().manual_seed(page.SEED)
    student = (3 * torch.randn(4, vocab_size, generator=generator)).bfloat16()
    teacher = (3 * torch.randn(4, vocab_size, generator=generator)).bfloat16()
    exact = page.mean_kl(student.double(), teacher.double())
    in_bf16 = page.mean_kl(student, teacher).double()
    in_fp32 = page.mean_kl(student.float(), teacher.float()).double()
    assert_close(in_fp32, exact, rtol=1e-5, atol=0)
    assert (in_bf16 - exact).abs() > 100 * (in_fp32 - exact).abs()
    assert (in_bf16 - exact).abs() / exact > 2**-10  # well above float32 rounding


def test_page_errors_show_bfloat16_worse_than_float32():
    errors = page.bf16_errors
    assert errors["F.kl_div in float32"] < 1e-5
    assert errors["F.kl_div in bfloat16"] > 100 * errors["F.kl_div in float32"]


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


def test_upcast_call_of_what_to_remember_runs_as_written():
    student = page.student[:2]
    log_q = run_inline("student.float().log_softmax(dim=-1)", student=student)
    assert log_q.dtype == torch.float32
    assert_close(log_q, student.double().log_softmax(dim=-1).float())
