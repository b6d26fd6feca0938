"""Claims of the page "KL over a large vocabulary, in chunks"."""

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from snippets import large_vocab as page

RELATIVE = {"rtol": 1e-5, "atol": 0}


def test_straightforward_version_creates_several_logits_sized_tensors():
    operations = page.large_allocations(page.straightforward_kl)
    assert len(operations) == 8
    assert operations.count("aten._log_softmax.default") == 2


def test_chunked_version_creates_only_the_gradient():
    operations = page.large_allocations(lambda s, t: page.chunked_kl(s, t, 8))
    assert operations == ["aten.empty_like.default"]


def test_chunked_value_and_gradients_match_kl_div_to_1e_5_relative():
    for chunked, reference in zip(page.chunked, page.reference, strict=True):
        scale = reference.abs().max()
        assert_close(chunked / scale, reference / scale, rtol=0, atol=1e-5)
    assert max(page.relative_differences) < 1e-5


def test_row_count_need_not_be_a_multiple_of_the_chunk_size():
    assert page.n_rows % 8 != 0
    assert len(page.row_chunks(page.n_rows, 8)) == 5


def test_hand_written_backward_passes_gradcheck():
    assert page.gradcheck_passed


def test_default_chunk_holds_about_a_million_values():
    assert page.CHUNK_VALUES == 2**20
    student = torch.zeros(3, 128_000, requires_grad=True)
    loss = page.chunked_kl(student, student.detach())
    assert loss.grad_fn.chunk_size == 8  # 2**20 // 128_000 rows of 128k values
    assert_close(loss.detach(), torch.tensor(0.0), rtol=0, atol=1e-6)


def test_chunked_kl_keeps_its_work_on_the_logits_device():
    # the meta device stands in for a GPU: any CPU-made tensor would clash with it
    student = torch.empty(5, 7, device="meta", requires_grad=True)
    loss = page.chunked_kl(student, torch.empty(5, 7, device="meta"), 2)
    loss.backward()
    assert loss.device.type == student.grad.device.type == "meta"


def test_chunked_kl_works_in_the_wider_dtype_of_its_two_inputs():
    student, teacher = page.student.float(), page.teacher.double()
    value = page.chunked_kl(student, teacher, 8)
    reference = page.straightforward_kl(student.double(), teacher)
    assert value.dtype == torch.float64
    assert_close(value, reference, rtol=1e-6, atol=0)


def test_forward_keeps_only_its_inputs_and_three_numbers_per_row():
    student = page.student.clone().requires_grad_()
    loss = page.chunked_kl(student, page.teacher, 8)
    saved = loss.grad_fn.saved_tensors
    assert saved[0].data_ptr() == student.data_ptr()
    assert saved[1].data_ptr() == page.teacher.data_ptr()
    assert len(saved) == 5
    assert all(tensor.shape == (page.n_rows,) for tensor in saved[2:])


def test_half_precision_logits_are_processed_in_float32():
    student, teacher = page.student.half(), page.teacher.half()
    value = page.chunked_kl(student, teacher, 8)
    assert value.dtype == torch.float32
    reference = page.straightforward_kl(student.float(), teacher.float())
    assert_close(value, reference, **RELATIVE)


def test_masked_teacher_logits_contribute_zero_where_kl_div_gives_nan():
    teacher = page.teacher.clone()
    teacher[:, -10:] = -torch.inf  # a masked part of the vocabulary
    assert page.straightforward_kl(page.student, teacher).isnan()
    p = teacher.softmax(dim=-1)
    log_q = page.student.log_softmax(dim=-1)
    expected = (torch.xlogy(p, p) - p * log_q).sum(dim=-1).mean()
    student = page.student.clone().requires_grad_()
    value = page.chunked_kl(student, teacher, 8)
    (gradient,) = torch.autograd.grad(value, student)
    assert_close(value, expected, **RELATIVE)
    assert gradient.isfinite().all()


def test_gradients_are_the_closed_forms():
    student = page.student.double().requires_grad_()
    teacher = page.teacher.double().requires_grad_()
    value = page.chunked_kl(student, teacher, 8)
    grad_s, grad_t = torch.autograd.grad(value, (student, teacher))
    q, p = student.softmax(-1), teacher.softmax(-1)
    log_ratio = p.log() - q.log()
    kl_rows = (p * log_ratio).sum(-1, keepdim=True)
    n = student.size(0)
    assert_close(grad_s, (q - p) / n, rtol=1e-9, atol=1e-15)
    assert_close(grad_t, p * (log_ratio - kl_rows) / n, rtol=1e-9, atol=1e-15)


def test_straightforward_version_is_f_kl_div_batchmean_with_log_target():
    expected = F.kl_div(
        page.student.log_softmax(-1),
        page.teacher.log_softmax(-1),
        reduction="batchmean",
        log_target=True,
    )
    assert_close(page.straightforward_kl(page.student, page.teacher), expected)
