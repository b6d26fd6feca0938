"""Claims of the page "Half precision", checked on its own snippet."""

import math
import re
from pathlib import Path

import jupytext
import pytest
import torch
import torch.nn.functional as F
from copyable import run_inline
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from snippets import half_precision as page

FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}
ALL_TYPES = [torch.float32, torch.bfloat16, torch.float16]
FP16_MIN = torch.finfo(torch.float16).min
FP16_OVERFLOW = torch.finfo(torch.float16).max + 32 / 2  # max + half the spacing
SEED = 0
SEED_CONFIDENT = 11
SUPPORTING_TESTS = {
    "test_prose_dates_float16_cpu_log_softmax_to_pr_103315_in_2_2": (
        "guards the prose: the history of float16 log_softmax on CPU is dated to "
        "PyTorch 2.2 with its source, which the installed version cannot show"
    ),
    "test_prose_cites_158310_for_another_input_not_this_overflow": (
        "guards the prose: pytorch#158310 is cited for another input, as not run"
    ),
    "test_float16_cuda_log_softmax_is_finite_over_128k_equal_logits": (
        "on a GPU, checks that the overflow the page describes is CPU-only; the "
        "page claims nothing about CUDA here (it says CUDA was not run)"
    ),
}


MARKDOWN = "\n".join(
    cell.source
    for cell in jupytext.read(Path(page.__file__)).cells
    if cell.cell_type == "markdown"
)


def prose_sentence(containing):
    """The page's sentence (between full stops) that contains ``containing``."""
    text = " ".join(MARKDOWN.split())
    [sentence] = [s for s in re.split(r"(?<=\.)\s", text) if containing in s]
    return sentence


def masked_kl(logits, mask_value):
    return page.kl_with_masked_logits(logits, page.target, page.mask, mask_value)


def test_bfloat16_has_float32_range_and_8_significant_bits():
    bf16, fp32 = torch.finfo(torch.bfloat16), torch.finfo(torch.float32)
    assert bf16.tiny == fp32.tiny
    assert_close(bf16.max, fp32.max, rtol=1e-2, atol=0)
    assert bf16.eps == 2.0**-7  # 8 significant bits
    assert torch.finfo(torch.float16).eps == 2.0**-10  # 11 significant bits
    assert torch.finfo(torch.float16).max == 65_504  # the narrow range


def test_spacing_next_to_finfo_min_is_32_in_float16_and_far_larger_elsewhere():
    """The review: bfloat16's spacing there is 2**120, not about 10**31 as said."""
    # the spacing of the top binade: 2 ** (max exponent - mantissa bits)
    assert torch.finfo(torch.float16).min == -65_504
    assert page.spacing_at_min(torch.float16) == 2.0 ** (15 - 10) == 32
    assert page.spacing_at_min(torch.float32) == 2.0 ** (127 - 23)
    assert page.spacing_at_min(torch.bfloat16) == 2.0 ** (127 - 7)
    assert "10^{31}" not in MARKDOWN
    assert "the table above" in prose_sentence("spacing next to `finfo.min` is")


def test_smallest_positive_values_are_the_subnormals_of_each_type():
    assert page.smallest_positive(torch.float32) == 2.0**-149
    assert page.smallest_positive(torch.bfloat16) == 2.0**-133
    assert page.smallest_positive(torch.float16) == 2.0**-24


@given(gap=st.floats(0.0, 130.0), dtype=st.sampled_from(ALL_TYPES))
@settings(max_examples=80)
def test_softmax_rounds_a_probability_to_zero_exactly_beyond_the_underflow_gap(
    gap, dtype
):
    threshold = page.underflow_gap(dtype)
    assume(abs(gap - threshold) > 1e-3)
    p = torch.tensor([0.0, -gap], dtype=dtype).softmax(dim=-1)
    assert (p[1] == 0) == (gap > threshold)


def test_bfloat16_underflows_a_little_before_float32():
    fp32, bf16 = (page.underflow_gap(t) for t in (torch.float32, torch.bfloat16))
    # smallest positive 2**-133 against 2**-149: 16 fewer bits below tiny
    assert fp32 - bf16 == pytest.approx(16 * math.log(2), rel=1e-12)


def test_float16_spacing_at_its_minimum_is_32_and_half_of_it_overflows():
    assert torch.tensor(FP16_MIN - 15.99, dtype=torch.float32).half() == FP16_MIN
    assert torch.tensor(FP16_MIN - 16.0, dtype=torch.float32).half() == -math.inf


def test_finfo_min_mask_overflows_in_float16_only_once_the_largest_logit_reaches_16():
    for largest in page.largest_logits:
        logits = torch.tensor([largest, 0.0, 0.5], dtype=torch.float16)
        assert masked_kl(logits, FP16_MIN).isnan() == (largest >= 16)
        # one dominant logit: the log-sum-exp is the largest logit plus
        # log(1 + sum of the others' e^(z - largest)), far below float16's spacing
        lse = torch.logsumexp(logits.double(), dim=0).item()
        rest = math.exp(-largest) + math.exp(0.5 - largest)
        assert lse == pytest.approx(largest + math.log1p(rest), rel=1e-12)
        assert lse - largest < 1e-3
    sixteen = torch.tensor(16.0, dtype=torch.float16)
    just_below = sixteen.nextafter(torch.zeros_like(sixteen))
    assert page.largest_logits[1] == just_below.item()


@pytest.mark.parametrize("vocab", [3, 100, 32_000])
def test_finfo_min_overflows_once_the_logsumexp_reaches_16(vocab):
    """With many similar logits the largest can stay well below 16; the levels
    put the log-sum-exp at 16 ± 0.1 and 16 ± 0.01 for each vocabulary (below
    65,520 classes, so the sum of exponentials cannot overflow)."""
    assert vocab < FP16_OVERFLOW
    near_16 = [target - math.log(vocab - 1) for target in (15.9, 15.99, 16.01, 16.1)]
    checked = {"finite": 0, "-inf": 0}
    for level in [-2.0, 0.0, 2.0, 5.0, 8.0, 12.0, 16.0, *near_16]:
        logits = torch.full((vocab,), level, dtype=torch.float16)
        logits[0] = FP16_MIN
        lse = torch.logsumexp(logits[1:].double(), dim=0).item()
        masked = logits.log_softmax(dim=-1)[0]
        if lse < 16 - 1e-3:
            assert masked.isfinite()
            checked["finite"] += 1
        elif lse > 16 + 1e-3:
            assert masked == -math.inf
            checked["-inf"] += 1
    assert checked["finite"] >= 2 and checked["-inf"] >= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finfo_min_survives_in_float32_and_bfloat16(dtype):
    logits = torch.tensor([30.0, 0.0, 0.5], dtype=dtype)
    assert masked_kl(logits, torch.finfo(dtype).min).isfinite()
    assert_close(masked_kl(logits, torch.finfo(dtype).min), masked_kl(logits, -1e4))


def reference_kl(logits, target, mask):
    """KL over the unmasked classes, from the definition in float64."""
    log_q = logits.double().masked_fill(mask, -math.inf).log_softmax(dim=-1)
    target = target.double()
    terms = torch.where(target > 0, target * (target.log() - log_q), 0.0)
    return terms.sum(dim=-1)


def padded_attention_batch(vocab, scale, shift, dtype, seed=0):
    """(batch, tokens, vocab) logits, a padding mask over tokens and a class mask
    (forbidden tokens); the target is 0 on masked classes."""
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(2, 3, vocab, generator=generator) + shift
    class_mask = torch.rand(vocab, generator=generator) < 0.25
    class_mask[0] = False
    target = (
        torch.randn(2, 3, vocab, generator=generator)
        .masked_fill(class_mask, -math.inf)
        .softmax(dim=-1)
    )
    padding_mask = torch.tensor([[True, True, True], [True, True, False]])
    return logits.to(dtype), target, class_mask, padding_mask


def recommended_kl(logits, target, class_mask, padding_mask, upcast):
    if upcast:
        logits = run_inline("logits.float().log_softmax(dim=-1)", logits=logits)
    log_q = logits.masked_fill(class_mask, page.MASK_VALUE).log_softmax(dim=-1)
    terms = F.kl_div(log_q, target.to(log_q.dtype), reduction="none").sum(dim=-1)
    return terms[padding_mask]


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@settings(max_examples=25)
@given(
    scale=st.floats(0.05, 20.0),
    shift=st.floats(-50.0, 50.0),
    dtype=st.sampled_from(ALL_TYPES),
    vocab=st.sampled_from([5, 1000]),
)
def test_mask_value_gives_the_kl_over_unmasked_classes_in_every_type(
    scale, shift, dtype, vocab
):
    logits, target, class_mask, padding_mask = padded_attention_batch(
        vocab, scale, shift, dtype
    )
    expected = reference_kl(logits, target, class_mask)[padding_mask]
    got = recommended_kl(logits, target, class_mask, padding_mask, upcast=False)
    assert got.isfinite().all()
    bound = TOLERANCE[dtype] * (1 + expected.abs()) + 4 * torch.finfo(dtype).eps
    assert ((got.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("dtype", ALL_TYPES, ids=str)
@pytest.mark.parametrize("vocab", [32_000, 128_000])
def test_mask_value_with_float32_log_softmax_at_llm_vocabularies(vocab, dtype):
    for scale in [0.02, 1.0, 4.0]:  # an untrained head, then trained ones
        logits, target, class_mask, padding_mask = padded_attention_batch(
            vocab, scale, 0.0, dtype
        )
        expected = reference_kl(logits, target, class_mask)[padding_mask]
        got = recommended_kl(logits, target, class_mask, padding_mask, upcast=True)
        assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_mask_value_in_float16_itself_survives_at_32k():
    logits, target, class_mask, padding_mask = padded_attention_batch(
        32_000, 0.02, 0.0, torch.float16
    )
    got = recommended_kl(logits, target, class_mask, padding_mask, upcast=False)
    assert got.isfinite().all()


def test_float16_cpu_log_softmax_is_minus_infinity_from_65520_equal_logits():
    """The review: 65,505 to 65,519 equal logits stay finite; -inf from 65,520."""
    assert FP16_OVERFLOW == 65_520
    assert page.classes_at_the_threshold == [FP16_OVERFLOW - 1, FP16_OVERFLOW]
    for n_classes in [65_505, *page.classes_at_the_threshold]:
        row = torch.zeros(n_classes, dtype=torch.float16).log_softmax(dim=-1)
        assert row.isfinite().all() == (n_classes < FP16_OVERFLOW)
        assert (row == -math.inf).all() == (n_classes >= FP16_OVERFLOW)
    assert "65,520" in prose_sentence("rounds to $\\infty$ once")
    assert "more than 65,504" not in MARKDOWN
    assert (page.flat_logits.log_softmax(dim=-1) == -math.inf).all()
    assert page.flat_logits.float().log_softmax(dim=-1).isfinite().all()
    assert page.flat_logits.bfloat16().log_softmax(dim=-1).isfinite().all()


def test_untrained_float16_logits_over_128k_give_minus_infinity_whatever_the_mask():
    """An untrained head (logits with standard deviation 0.02) over 128,000
    classes: a sum of exponentials far past 65,520, so every log-probability is
    -inf, with a moderate mask, a finfo.min mask or none."""
    generator = torch.Generator().manual_seed(SEED)
    logits = (0.02 * torch.randn(128_000, generator=generator)).half()
    mask = torch.rand(128_000, generator=generator) < 0.25
    for mask_value in [page.MASK_VALUE, FP16_MIN, None]:
        masked = logits if mask_value is None else logits.masked_fill(mask, mask_value)
        assert (masked.log_softmax(dim=-1) == -math.inf).all()
        assert masked.float().log_softmax(dim=-1).isfinite().all()


@given(
    n_classes=st.integers(50_000, 140_000),
    spread=st.sampled_from([0.0, 0.01, 0.1, 0.5]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=20)
def test_float16_cpu_log_softmax_overflows_iff_its_sum_of_exponentials_reaches_65520(
    n_classes, spread, seed
):
    generator = torch.Generator().manual_seed(seed)
    logits = (spread * torch.randn(n_classes, generator=generator)).half()
    shifted = logits.double() - logits.double().max()
    total = shifted.exp().sum().item()  # in float64: the reference
    assume(abs(total - FP16_OVERFLOW) > 8)  # the kernel sums in float32
    row = logits.log_softmax(dim=-1)
    assert (row == -math.inf).all() == (total >= FP16_OVERFLOW)
    assert row.isfinite().all() == (total < FP16_OVERFLOW)


def test_prose_dates_float16_cpu_log_softmax_to_pr_103315_in_2_2():
    """The review: PR #103315 was merged after 2.1 (pytorch#142368: 2.2+)."""
    sentence = prose_sentence("PR #103315")
    assert "PyTorch 2.2" in sentence and "2.1" not in sentence
    assert "[pytorch#142368]" in sentence


def test_prose_cites_158310_for_another_input_not_this_overflow():
    sentence = prose_sentence("[pytorch#158310];")
    assert "another" in sentence and "not run here" in sentence


@pytest.mark.cuda
def test_float16_cuda_log_softmax_is_finite_over_128k_equal_logits():
    flat = page.flat_logits.cuda()
    assert flat.log_softmax(dim=-1).isfinite().all()


def test_float16_cannot_represent_values_below_about_6e_8():
    assert torch.tensor(2.0**-24).half() > 0  # 5.96e-8, the smallest float16
    assert torch.tensor(2.9e-8).half() == 0


def test_teacher_logits_have_standard_deviation_about_4():
    assert_close(page.teacher_logits.std(), torch.tensor(4.0), rtol=0.01, atol=0)


def test_most_probabilities_of_a_large_vocabulary_are_below_float16_range():
    p = page.teacher_logits.softmax(dim=-1)
    assert (p < 6e-8).float().mean() > 0.5


def test_float16_softmax_rounds_most_probabilities_to_zero_bfloat16_none():
    q16 = page.student_logits.half().softmax(dim=-1)
    q_bf16 = page.student_logits.bfloat16().softmax(dim=-1)
    assert (q16 == 0).float().mean() > 0.5
    assert (q_bf16 == 0).sum() == 0


def test_float16_softmax_then_log_gives_no_finite_kl_bfloat16_does():
    args = (page.student_logits, page.teacher_logits)
    assert page.kl_of_softmax_then_log(*args, torch.float16).isnan()
    assert page.kl_of_softmax_then_log(*args, torch.bfloat16).isfinite()
    # one class rounded to 0 in both P and Q is enough: 0 · (-inf) is NaN
    generator = torch.Generator().manual_seed(SEED)
    student, teacher = torch.randn(2, 1, 1000, generator=generator)
    assert page.kl_of_softmax_then_log(student, teacher, torch.float16).isfinite()
    student[0, 7] = teacher[0, 7] = -30.0  # e**-30 is below float16's range
    p, q = (x.half().softmax(dim=-1) for x in (teacher, student))
    assert (p == 0).sum() == (q == 0).sum() == 1 and p[0, 7] == q[0, 7] == 0
    assert page.kl_of_softmax_then_log(student, teacher, torch.float16).isnan()
    assert page.kl_of_softmax_then_log(student, teacher, torch.bfloat16).isfinite()


def float64_kl():
    return page.kl_of_log_softmax(
        page.student_logits, page.teacher_logits, torch.float64
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_log_softmax_is_finite_but_rounded(dtype):
    """The KL is within two of the type's spacings of the float64 value and more
    than five times further from it than the float32 one (measured: 9 to 39
    times, depending on the threads that sum it); each log-probability is the
    float64 one of the same rounded logits, to within the type's eps."""
    exact = float64_kl().item()
    kl = page.kl_of_log_softmax(page.student_logits, page.teacher_logits, dtype)
    assert kl.dtype == dtype and kl.isfinite()
    spacing = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(exact))
    assert abs(kl.item() - exact) <= 2 * spacing
    assert abs(kl.item() - exact) > 5 * abs(page.kl_upcast.item() - exact)
    logits = page.student_logits.to(dtype)
    log_q = logits.log_softmax(dim=-1)
    reference = logits.double().log_softmax(dim=-1)
    assert log_q.dtype == dtype and log_q.isfinite().all()
    error = (log_q.double() - reference).abs()
    assert (error <= torch.finfo(dtype).eps * reference.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_upcast_log_softmax_matches_float64(dtype):
    """Half-precision logits cast up to float32 before log_softmax give the KL of
    the same logits computed in float64."""
    student, teacher = page.student_half.to(dtype), page.teacher_half.to(dtype)
    exact = page.kl_of_log_softmax(student, teacher, torch.float64)
    upcast = page.kl_of_log_softmax(student, teacher, torch.float32)
    assert upcast.dtype == torch.float32
    assert_close(upcast.double(), exact, rtol=1e-4, atol=0)
    if dtype == torch.float16:
        assert_close(page.kl_half_upcast.double(), exact, rtol=1e-4, atol=0)
    assert_close(page.kl_upcast.double(), float64_kl(), rtol=1e-4, atol=0)


def test_bfloat16_softmax_then_log_is_nan_where_float32_is_and_a_little_sooner():
    """The review: bf16 shares float32's underflow NaNs; the page's cases."""
    for case, second_logit in page.second_logits.items():
        for dtype in (torch.float32, torch.bfloat16):
            naive, in_log_space = page.kl_of_two_classes(second_logit, dtype)
            underflows = -second_logit > page.underflow_gap(dtype)
            assert math.isnan(naive) == underflows, (case, dtype)
            if not math.isnan(naive):
                assert naive == 0  # KL(P‖P)
            assert math.isnan(in_log_space) == (second_logit == -math.inf)
            if not math.isnan(in_log_space):
                assert in_log_space == 0  # KL(P‖P)
    gap_100 = page.second_logits["gap 100"]
    assert not math.isnan(page.kl_of_two_classes(gap_100, torch.float32)[0])
    assert math.isnan(page.kl_of_two_classes(gap_100, torch.bfloat16)[0])


@pytest.mark.parametrize("vocab", [32_000, 128_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_confident_logits_give_nan_after_softmax_then_log_in_float32_and_bfloat16(
    vocab, dtype
):
    """A confident head (logits with standard deviation 30) over a (batch, tokens,
    vocabulary) batch: gaps past both underflows, so softmax then log is NaN in
    both types; log_softmax gives the float64 KL."""
    generator = torch.Generator().manual_seed(SEED_CONFIDENT)
    student, teacher = 30 * torch.randn(2, 2, 3, vocab, generator=generator)
    naive = page.kl_of_softmax_then_log(student, teacher, dtype)
    assert naive.isnan()
    in_log_space = page.kl_of_log_softmax(student, teacher, torch.float32)
    reference = page.kl_of_log_softmax(student, teacher, torch.float64)
    assert_close(in_log_space.double(), reference, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", ALL_TYPES, ids=str)
def test_minus_infinity_mask_is_nan_where_the_target_is_zero_in_every_type(dtype):
    logits = torch.tensor([[0.0, 1.0, -math.inf]], dtype=dtype)
    log_q = logits.log_softmax(dim=-1)
    zero_target = torch.tensor([[0.5, 0.5, 0.0]], dtype=dtype)
    assert F.kl_div(log_q, zero_target, reduction="sum").isnan()
    positive_target = torch.tensor([[0.5, 0.25, 0.25]], dtype=dtype)
    assert F.kl_div(log_q, positive_target, reduction="sum") == math.inf


def test_cpu_autocast_runs_kl_div_but_not_log_softmax_in_float32():
    for dtype in [torch.float16, torch.bfloat16]:
        kl, log_q_dtype = page.kl_under_autocast(
            page.student_half, page.teacher_half, dtype
        )
        assert kl.dtype == torch.float32
        assert log_q_dtype == dtype


def test_autocast_keeps_the_error_of_half_precision_log_softmax():
    kl, _ = page.kl_under_autocast(page.student_half, page.teacher_half, torch.half)
    half_log_probs = F.kl_div(
        page.student_half.log_softmax(dim=-1).float(),
        page.teacher_half.log_softmax(dim=-1).float(),
        reduction="batchmean",
        log_target=True,
    )
    assert_close(kl, half_log_probs, **FLOAT32)
    assert not torch.isclose(kl, page.kl_half_upcast, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_upcast_under_cpu_autocast_matches_float64(dtype):
    """Under CPU autocast, logits.float().log_softmax(dim=-1) stays in float32 and
    gives the float64 KL of the same logits; plain autocast does not."""
    student, teacher = page.student_half.to(dtype), page.teacher_half.to(dtype)
    exact = page.kl_of_log_softmax(student, teacher, torch.float64)
    with torch.autocast("cpu", dtype=dtype):
        log_q = run_inline("logits.float().log_softmax(dim=-1)", logits=student)
        log_p = run_inline("logits.float().log_softmax(dim=-1)", logits=teacher)
        kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    assert log_q.dtype == log_p.dtype == kl.dtype == torch.float32
    assert_close(kl.double(), exact, rtol=1e-4, atol=0)
    plain, _ = page.kl_under_autocast(student, teacher, dtype)
    assert not torch.isclose(plain.double(), exact, rtol=1e-4, atol=0)


def test_installed_autocast_header_lists_kl_div_and_log_softmax_in_float32():
    """The installed ATen header: kl_div in AT_FORALL_FP32, log_softmax (int dim)
    in AT_FORALL_FP32_SET_OPT_DTYPE (the lists autocast_mode.cpp registers)."""
    header = Path(torch.__file__).parent / "include/ATen/autocast_mode.h"
    if not header.exists():
        pytest.skip("this torch build ships no ATen headers")
    lists = {}
    for match in re.finditer(
        r"#define (AT_FORALL_\w+)\(_\)(.*?)\n\n", header.read_text(), re.S
    ):
        lists[match[1]] = re.findall(r"_\(([^)]*)\)", match[2])
    assert "kl_div" in lists["AT_FORALL_FP32"]
    assert "log_softmax, int" in lists["AT_FORALL_FP32_SET_OPT_DTYPE"]
    assert "kl_div" not in lists["AT_FORALL_LOWER_PRECISION_FP"]


@pytest.mark.cuda
def test_cuda_autocast_runs_kl_div_and_log_softmax_in_float32():
    student, teacher = page.student_half.cuda(), page.teacher_half.cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        log_q = student.log_softmax(dim=-1)
        kl = F.kl_div(
            log_q, teacher.log_softmax(dim=-1), reduction="batchmean", log_target=True
        )
    assert log_q.dtype == torch.float32
    assert kl.dtype == torch.float32


def test_summary_calls_run_as_written():
    assert run_inline("MASK_VALUE = -1e4")["MASK_VALUE"] == page.MASK_VALUE
    mask_value = run_inline("torch.finfo(torch.float16).min")
    logits = torch.tensor([16.0, 0.0, 0.5], dtype=torch.float16)
    assert masked_kl(logits, mask_value).isnan()
    assert not masked_kl(logits, page.MASK_VALUE).isnan()
