"""Claims of the page "Knowledge distillation: temperature and the T² factor"."""

import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from copyable import run_inline
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from snippets import distillation as page

SUPPORTING_TESTS = {
    "test_liger_kernel_is_cited_at_a_commit_that_exists": (
        "guards the prose against the earlier hash 01ed383 of the Liger-Kernel"
        " citation; ead96b6 was checked by hand"
    ),
}

FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}
FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}


HEADLINE = """loss = F.kl_div(
    F.log_softmax(z_s.float() / T, dim=-1),
    F.log_softmax(z_t.float() / T, dim=-1),
    reduction="batchmean",
    log_target=True,
) * T**2"""


def kl_rows_float64(student_logits, teacher_logits, temperature=1.0):
    """Σ p (log p − log q) per row, from the definition in float64: the reference."""
    log_p = (teacher_logits.double() / temperature).log_softmax(dim=-1)
    log_q = (student_logits.double() / temperature).log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def test_teacher_as_probabilities_or_log_probabilities_gives_the_same_loss():
    assert_close(page.with_log_target, page.with_probabilities, **FLOAT32)


def test_loss_is_t_squared_times_the_mean_kl_per_example():
    t = page.temperature
    reference = t**2 * kl_rows_float64(page.student_logits, page.teacher_logits, t)
    assert_close(page.with_log_target.double(), reference.mean(), **FLOAT32)


def test_prose_formula_runs_as_written_and_is_the_page_loss():
    names = {"z_s": page.student_logits, "z_t": page.teacher_logits, "T": 4.0}
    bound = run_inline(
        """loss = F.kl_div(
    F.log_softmax(z_s.float() / T, dim=-1),
    F.log_softmax(z_t.float() / T, dim=-1),
    reduction="batchmean",
    log_target=True,
) * T**2""",
        **names,
    )
    assert bound["loss"] == run_inline(HEADLINE, **names)["loss"]  # the same block
    assert_close(bound["loss"], page.with_log_target, **FLOAT32)


def near_teacher_pair(vocab_size, dtype, rows=4, noise=1.0, seed=0):
    """Teacher logits of std 5 and a student off by noise, rounded to dtype."""
    generator = torch.Generator().manual_seed(seed)
    teacher = 5 * torch.randn(rows, vocab_size, generator=generator)
    student = teacher + noise * torch.randn(rows, vocab_size, generator=generator)
    return student.to(dtype), teacher.to(dtype)


@pytest.mark.parametrize("temperature", [1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_headline_block_matches_float64_for_half_precision_logits_at_32k(
    dtype, temperature
):
    z_s, z_t = near_teacher_pair(32_000, dtype)
    loss = run_inline(HEADLINE, z_s=z_s, z_t=z_t, T=temperature)["loss"]
    reference = temperature**2 * kl_rows_float64(z_s, z_t, temperature).mean()
    assert_close(loss.double(), reference, rtol=2e-5, atol=0)
    quotient = run_inline("z_s.float() / T", z_s=z_s, T=temperature)
    assert quotient.dtype == torch.float32


def test_headline_block_without_float_is_off_by_percents_in_bfloat16():
    z_s, z_t = near_teacher_pair(32_000, torch.bfloat16)
    in_bfloat16 = HEADLINE.replace(".float()", "")
    for temperature in (1.5, 2.0, 3.0):
        loss = run_inline(in_bfloat16, z_s=z_s, z_t=z_t, T=temperature)["loss"]
        reference = temperature**2 * kl_rows_float64(z_s, z_t, temperature).mean()
        assert abs(loss.double() / reference - 1) > 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_the_quotient_in_half_precision_costs_the_loss_digits(dtype):
    z_s, z_t = near_teacher_pair(32_000, dtype)
    # the headline block with the quotient taken in half precision, then cast:
    # log_softmax still runs in float32, only z / T is rounded
    rounded = HEADLINE.replace("z_s.float() / T", "(z_s / T).float()")
    rounded = rounded.replace("z_t.float() / T", "(z_t / T).float()")
    assert rounded.count("/ T).float()") == 2
    errors = {}
    for temperature in (1.5, 2.0):
        loss = run_inline(rounded, z_s=z_s, z_t=z_t, T=temperature)["loss"]
        reference = temperature**2 * kl_rows_float64(z_s, z_t, temperature).mean()
        errors[temperature] = abs(loss.double() / reference - 1).item()
        cast_first = run_inline(HEADLINE, z_s=z_s, z_t=z_t, T=temperature)["loss"]
        if temperature == 2.0:  # a power of 2: the quotient is exact, nothing lost
            assert torch.equal(loss, cast_first)
        else:
            cast_first_error = abs(cast_first.double() / reference - 1).item()
            assert cast_first_error < 2e-5
    # relative to casting first, not an absolute bound: that depends on the seed
    assert errors[1.5] > 50 * cast_first_error


def test_log_softmax_without_dim_normalises_over_the_batch_for_3d_input():
    logits = page.lm_student[:, :3, :50]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        implicit = F.log_softmax(logits)  # the pitfall the prose names
    assert any("Implicit dimension" in str(w.message) for w in caught)
    assert_close(implicit, F.log_softmax(logits, dim=0))
    assert not torch.allclose(implicit, F.log_softmax(logits, dim=-1))


def test_teacher_gets_no_gradient():
    teacher = page.teacher_logits.clone().requires_grad_()
    student = page.student_logits.clone().requires_grad_()
    page.distillation_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert isinstance(run_inline("torch.no_grad()"), torch.no_grad)


def test_hard_label_weight_is_lower_than_the_soft_target_weight():
    w = page.HARD_LABEL_WEIGHT
    assert w < 1 - w
    # the hard-label term of the page's total, against −log q(label) in float64:
    # the student's own softmax, at temperature 1 (no division by T)
    hard_term = (page.total_loss.double() - (1 - w) * page.with_log_target) / w
    log_q = page.student_logits.double().log_softmax(dim=-1)
    reference = -log_q.gather(-1, page.labels[:, None]).mean()
    assert_close(hard_term, reference, rtol=1e-5, atol=0)
    at_t = F.cross_entropy(page.student_logits / page.temperature, page.labels)
    assert abs(hard_term - at_t) > 1  # the cross-entropy at T = 4 is another term


def test_without_t_squared_the_gradient_shrinks_as_one_over_t_squared():
    plain = torch.tensor(page.plain_norms)
    t = torch.tensor(page.TEMPERATURES)
    scaled_back = plain * t**2
    # for large T the product settles: 1/T² is the rate
    assert_close(scaled_back[-1], scaled_back[-2], rtol=0.02, atol=0)
    assert (plain.diff() < 0).all()
    assert plain.max() / plain.min() > 1000


@pytest.mark.parametrize("name", ["random pair", "near teacher"])
def test_t_squared_scaled_gradient_tends_to_hintons_limit_on_the_page(name):
    student, teacher = page.PAIRS[name]
    gradient = page.student_gradient(student, teacher, page.TEMPERATURES[-1])
    limit = page.large_temperature_limit(student, teacher)
    assert (gradient - limit).norm() < 0.1 * limit.norm()
    assert_close(page.scaled_norms[name][-1], page.limit_norms[name], rtol=0.02, atol=0)


@settings(max_examples=20)
@given(
    logit_std=st.sampled_from([0.1, 1.0, 5.0, 10.0]),
    near=st.booleans(),
    n_classes=st.sampled_from([10, 100, 32_000]),
    seed=st.integers(0, 2**16),
)
def test_t_squared_scaled_gradient_tends_to_a_constant_as_t_grows(
    logit_std, near, n_classes, seed
):
    generator = torch.Generator().manual_seed(seed)
    shape = (3, n_classes)
    teacher = logit_std * torch.randn(shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    student = teacher + noise if near else logit_std * noise
    limit = page.large_temperature_limit(student, teacher)
    errors = []
    for t in (100.0, 1000.0, 10_000.0):
        t = t * max(logit_std, 1.0)
        gradient = page.student_gradient(student, teacher, t)
        errors.append(((gradient - limit).norm() / limit.norm()).item())
    assert errors[-1] < 1e-3
    assert errors[0] > errors[1] > errors[2]  # it settles, at rate 1/T


def test_the_scaled_gradient_is_not_within_a_factor_of_two_for_a_near_student():
    norms = dict(zip(page.TEMPERATURES, page.scaled_norms["near teacher"], strict=True))
    above_one = [norm for t, norm in norms.items() if t >= 1]
    assert max(above_one) / min(above_one) > 2


@pytest.mark.parametrize("name", ["random pair", "near teacher"])
def test_for_the_pages_logits_the_scaled_gradient_falls_below_t_1(name):
    norms = dict(zip(page.TEMPERATURES, page.scaled_norms[name], strict=True))
    assert norms[0.25] < norms[0.5] < norms[1.0]
    tiny = page.student_gradient(*page.PAIRS[name], 0.01).norm().item()
    assert tiny < 0.2 * norms[1.0]


def random_pair_float64(logit_std, rows, n_classes, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (rows, n_classes)
    teacher = logit_std * torch.randn(shape, generator=generator, dtype=torch.float64)
    student = logit_std * torch.randn(shape, generator=generator, dtype=torch.float64)
    return student, teacher


@settings(max_examples=20)
@given(
    logit_std=st.floats(1e-3, 100.0),
    n_classes=st.sampled_from([10, 100, 32_000]),
    seed=st.integers(0, 2**16),
)
def test_the_scaled_gradient_goes_to_zero_as_t_goes_to_zero(logit_std, n_classes, seed):
    rows = 3
    student, teacher = random_pair_float64(logit_std, rows, n_classes, seed)
    norms = []
    for t in (1e-2 * logit_std, 1e-3 * logit_std, 1e-4 * logit_std):
        norms.append(page.student_gradient(student, teacher, t).norm().item())
        # T (q_T − p_T) / rows, and each row's ‖q − p‖ is at most √2
        assert norms[-1] <= t * math.sqrt(2 / rows) * (1 + 1e-9)
    assert norms[0] > norms[1] > norms[2]


@settings(max_examples=20)
@given(
    logit_std=st.floats(1e-2, 10.0),
    c=st.floats(1e-2, 100.0),
    t=st.floats(0.05, 20.0),
    seed=st.integers(0, 2**16),
)
def test_where_the_scaled_gradient_turns_scales_with_the_logits(logit_std, c, t, seed):
    student, teacher = random_pair_float64(logit_std, 3, 100, seed)
    norm = page.student_gradient(student, teacher, t).norm()
    scaled = page.student_gradient(c * student, c * teacher, c * t).norm()
    assert_close(scaled, c * norm, rtol=1e-9, atol=0)


def test_for_logits_of_small_spread_the_scaled_gradient_rises_well_below_t_1():
    student, teacher = random_pair_float64(0.1, 32, 100, seed=0)
    norms = [page.student_gradient(student, teacher, t).norm() for t in (1, 0.1, 0.05)]
    assert norms[0] < norms[1] < norms[2]


def test_soft_target_cross_entropy_has_the_same_student_gradient_as_the_kl():
    t = page.temperature
    soft_targets = F.softmax(page.teacher_logits / t, dim=-1)
    student = page.student_logits.clone().requires_grad_()
    cross_entropy = F.cross_entropy(student / t, soft_targets) * t**2
    (from_cross_entropy,) = torch.autograd.grad(cross_entropy, student)
    from_kl = page.student_gradient(page.student_logits, page.teacher_logits, t)
    assert_close(from_cross_entropy, from_kl, **FLOAT32)
    # they differ by the teacher's entropy (× T²), a constant for the student
    entropy = -(soft_targets * soft_targets.log()).sum(dim=-1).mean()
    assert_close(cross_entropy - page.with_log_target, t**2 * entropy, **FLOAT32)


def test_kl_gradient_is_q_minus_p_over_t_per_row():
    t = page.temperature
    student, teacher = page.student_logits.double(), page.teacher_logits.double()
    gradient = page.student_gradient(student, teacher, t, scale=False)
    q, p = (student / t).softmax(dim=-1), (teacher / t).softmax(dim=-1)
    assert_close(gradient, (q - p) / t / page.batch_size, **FLOAT64)


def test_batchmean_on_3d_logits_divides_by_the_batch_only():
    log_q = F.log_softmax(page.lm_student, dim=-1)
    log_p = F.log_softmax(page.lm_teacher, dim=-1)
    batchmean = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    per_position = kl_rows_float64(page.lm_student, page.lm_teacher)
    assert_close(batchmean.double(), per_position.sum() / page.lm_batch, **FLOAT32)
    assert_close(batchmean.double() / page.lm_tokens, per_position.mean(), **FLOAT32)


def padded_batch(vocab_size, dtype, seed=0):
    """(2, 6, V) student and teacher logits and a mask of 7 real response tokens."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 6, vocab_size, generator=generator).to(dtype)
    teacher = (3 * torch.randn(2, 6, vocab_size, generator=generator)).to(dtype)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    return student, teacher, mask


@pytest.mark.parametrize("vocab_size", [32_000, 128_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_loss_is_the_mean_over_real_tokens(vocab_size, dtype):
    student, teacher, mask = padded_batch(vocab_size, dtype)
    loss = page.masked_distillation_loss(student, teacher, mask, 2.0)
    assert loss.dtype == torch.float32  # computed in float32 from half inputs
    reference = 4.0 * kl_rows_float64(student[mask], teacher[mask], 2.0).mean()
    assert_close(loss.double(), reference, rtol=1e-4, atol=0)


def test_page_masked_loss_is_the_mean_over_its_real_tokens():
    real = page.response_mask
    reference = kl_rows_float64(page.lm_student[real], page.lm_teacher[real]).mean()
    assert page.lm_student.shape[-1] == page.VOCAB_SIZE
    assert_close(page.lm_loss.double(), reference, rtol=1e-5, atol=0)
    everything = kl_rows_float64(page.lm_student, page.lm_teacher).mean()
    assert_close(page.lm_loss_flattened.double(), everything, rtol=1e-5, atol=0)
    assert real.sum() < real.numel()  # prompt and padding are in the flattened mean
    # near the right one here, within 1 %: these random positions are all alike
    assert abs(page.lm_loss_flattened / page.lm_loss - 1) < 0.01


@pytest.mark.parametrize("garbage", [50.0, math.nan, math.inf])
def test_masked_loss_ignores_prompt_and_padding_positions(garbage):
    student, teacher, mask = padded_batch(32_000, torch.float32)
    with_garbage = torch.where(mask[..., None], student, garbage).requires_grad_()
    # selecting: the page's loss, as if the garbage were not there
    selected = page.masked_distillation_loss(with_garbage, teacher, mask, 1.0)
    (gradient,) = torch.autograd.grad(selected, with_garbage)
    reference = kl_rows_float64(student[mask], teacher[mask]).mean()
    assert_close(selected.double(), reference, rtol=1e-5, atol=0)
    assert (gradient[~mask] == 0).all() and gradient[mask].isfinite().all()
    # multiplying by the mask: zero times the garbage's KL
    kl_per_position = F.kl_div(
        F.log_softmax(with_garbage, dim=-1),
        F.log_softmax(teacher, dim=-1),
        reduction="none",
        log_target=True,
    ).sum(dim=-1)
    multiplied = (kl_per_position * mask).sum() / mask.sum()
    (multiplied_gradient,) = torch.autograd.grad(multiplied, with_garbage)
    if math.isfinite(garbage):  # finite garbage: multiplying works as well
        assert_close(multiplied, selected)
        assert_close(multiplied_gradient, gradient)
        flat_garbage, flat_teacher = with_garbage.flatten(0, 1), teacher.flatten(0, 1)
        flattened = page.distillation_loss(flat_garbage, flat_teacher, 1)
        plain = page.distillation_loss(student.flatten(0, 1), flat_teacher, 1)
        assert (flattened - plain).abs() > 0.1  # the flattened mean depends on them
    else:  # 0 · NaN is NaN: the loss and the logits' gradient are lost
        assert multiplied.isnan()
        assert not multiplied_gradient.isfinite().all()


@pytest.mark.parametrize("garbage", [math.nan, math.inf])
def test_garbage_hidden_states_at_padding_reach_the_heads_gradient_unless_selected(
    garbage,
):
    _, teacher, mask = padded_batch(32_000, torch.float32)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(*mask.shape, 64, generator=generator)
    hidden[~mask] = garbage  # what a model may leave at padded positions
    head = torch.nn.Linear(64, 32_000)

    def weight_gradient(loss):
        head.zero_grad()
        loss.backward()
        return head.weight.grad

    selected_logits = page.masked_distillation_loss(head(hidden), teacher, mask, 1.0)
    assert selected_logits.isfinite()  # the loss is clean ...
    assert weight_gradient(selected_logits).isnan().any()  # ... its gradient is not
    selected = run_inline("hidden[mask]", hidden=hidden, mask=mask)
    fixed = page.distillation_loss(head(selected), teacher[mask], 1.0)
    assert_close(fixed, selected_logits)
    assert weight_gradient(fixed).isfinite().all()
    cleaned = torch.where(mask[..., None], hidden, 0.0)
    fixed = page.masked_distillation_loss(head(cleaned), teacher, mask, 1.0)
    assert_close(fixed, selected_logits)
    assert weight_gradient(fixed).isfinite().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_are_cast_to_float32_before_they_are_divided_by_t(dtype):
    student, teacher = near_teacher_pair(32_000, dtype)
    # the quotient is exact in half precision only when T is a power of 2
    assert torch.equal((student / 2.0).double(), student.double() / 2.0)
    assert not torch.equal((student / 1.5).double(), student.double() / 1.5)
    loss = page.distillation_loss(student, teacher, 1.5)
    assert loss.dtype == torch.float32
    reference = 1.5**2 * kl_rows_float64(student, teacher, 1.5).mean()
    assert_close(loss.double(), reference, rtol=2e-5, atol=0)


def test_masked_sum_over_all_positions_shrinks_by_the_real_token_fraction():
    fraction = page.response_mask.float().mean()
    assert_close(page.lm_loss_wrong_count, page.lm_loss * fraction, **FLOAT32)
    assert fraction < 1


def test_mismatched_vocabularies_raise_a_value_error_and_cutting_the_padding_fixes_it():
    student, teacher, mask = padded_batch(32_000, torch.float32)
    padded_student = torch.cat([student, torch.randn(2, 6, 64)], dim=-1)
    with pytest.raises(ValueError, match="one tokenizer"):
        page.masked_distillation_loss(padded_student, teacher, mask, 1.0)
    vocab_size = teacher.shape[-1]
    bound = run_inline(
        "logits[..., :vocab_size]", logits=padded_student, vocab_size=vocab_size
    )
    fixed = page.masked_distillation_loss(bound, teacher, mask, 1.0)
    assert_close(fixed, page.masked_distillation_loss(student, teacher, mask, 1.0))


def test_reverse_loss_is_kl_student_teacher_and_trains_the_student():
    student = page.lm_student_tokens.double().requires_grad_()
    teacher = page.peaked_teacher.double()
    reverse = page.reverse_distillation_loss(student, teacher)
    reference = kl_rows_float64(teacher, student).mean()  # KL(q‖p): student first
    assert_close(reverse, reference, **FLOAT64)
    (gradient,) = torch.autograd.grad(reverse, student)
    # reference: ∂KL(q‖p)/∂z_s = q ⊙ (log q − log p − KL(q‖p)) per row, / rows
    log_q = student.detach().log_softmax(dim=-1)
    log_p = teacher.log_softmax(dim=-1)
    q = log_q.exp()
    kl_row = (q * (log_q - log_p)).sum(dim=-1, keepdim=True)
    assert_close(gradient, q * (log_q - log_p - kl_row) / student.shape[0], **FLOAT64)
    assert gradient.abs().sum() > 0
    assert abs(page.reverse_loss - page.full_loss) > 1  # another direction


@pytest.mark.parametrize("vocab_size, k", [(32_000, 64), (128_000, 20)])
def test_top_k_loss_is_the_kl_to_the_renormalised_teacher(vocab_size, k):
    student, teacher, mask = padded_batch(vocab_size, torch.float64)
    student, teacher = student[mask], teacher[mask]
    log_p_top, ids = page.top_k_teacher(teacher, k, temperature=2.0)
    loss = page.top_k_distillation_loss(student, log_p_top, ids, temperature=2.0)
    # reference: the renormalised teacher as a dense distribution, zero elsewhere
    p = torch.zeros_like(teacher).scatter(-1, ids, log_p_top.exp())
    log_q = (student / 2.0).log_softmax(dim=-1)
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)
    assert_close(loss, 4.0 * kl.mean(), **FLOAT64)


def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_loss():
    student, teacher = page.lm_student_tokens[:3], page.peaked_teacher[:3]
    log_p_top, ids = page.top_k_teacher(teacher, teacher.shape[-1])
    loss = page.top_k_distillation_loss(student, log_p_top, ids)
    assert_close(loss, page.distillation_loss(student, teacher, 1.0), **FLOAT32)


def test_top_k_loss_is_close_to_the_full_loss_far_from_the_teacher():
    assert page.top_k_mass.mean() > 0.99 and page.top_k_mass.min() > 0.98
    assert_close(page.top_k_loss, page.full_loss, rtol=0.01, atol=0)
    student, teacher, mask = padded_batch(128_000, torch.float32)
    teacher = 4 * teacher[mask]  # as confident as the page's teacher
    log_p_top, ids = page.top_k_teacher(teacher, page.TOP_K)
    kept = F.softmax(teacher, dim=-1).gather(-1, ids).sum(dim=-1)
    assert kept.mean() > 0.99
    loss = page.top_k_distillation_loss(student[mask], log_p_top, ids)
    full = page.distillation_loss(student[mask], teacher, 1.0)
    assert_close(loss, full, rtol=0.01, atol=0)


@pytest.mark.parametrize("vocab_size", [32_000, 128_000])
def test_top_k_loss_of_the_teacher_itself_is_minus_log_kept_mass(vocab_size):
    _, teacher, mask = padded_batch(vocab_size, torch.float64)
    teacher = 4 * teacher[mask]
    log_p_top, ids = page.top_k_teacher(teacher, page.TOP_K)
    kept = teacher.softmax(dim=-1).gather(-1, ids).sum(dim=-1)
    at_teacher = page.top_k_distillation_loss(teacher, log_p_top, ids)
    assert_close(at_teacher, -kept.log().mean(), **FLOAT64)
    assert at_teacher > 0
    assert page.distillation_loss(teacher, teacher, 1.0) == 0
    assert_close(page.top_k_at_teacher, -page.top_k_mass.log().mean())
    direct = page.top_k_distillation_loss(
        page.peaked_teacher, page.log_p_top, page.top_ids
    )
    assert_close(page.top_k_at_teacher, direct, rtol=1e-4, atol=0)


def test_top_k_loss_is_0_only_without_a_tail_and_pushes_the_students_tail_down():
    _, teacher, mask = padded_batch(32_000, torch.float64)
    teacher = 4 * teacher[mask]
    log_p_top, ids = page.top_k_teacher(teacher, page.TOP_K)
    # the renormalised teacher: no mass outside the k
    no_tail = torch.full_like(teacher, -math.inf).scatter(-1, ids, log_p_top)
    assert_close(
        page.top_k_distillation_loss(no_tail, log_p_top, ids).item(), 0.0, **FLOAT64
    )
    assert page.distillation_loss(no_tail, teacher, 1.0).isinf()
    student = teacher.clone().requires_grad_()  # start at the teacher itself
    page.top_k_distillation_loss(student, log_p_top, ids).backward()
    outside = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, ids, False)
    assert (student.grad[outside] > 0).all()  # a descent step lowers every tail logit


def test_near_the_page_teacher_the_top_k_gap_exceeds_the_full_kl():
    gap = page.near_top_k_loss - page.near_full_loss
    assert gap > page.near_full_loss
    assert_close(gap, page.top_k_at_teacher, rtol=0.3, atol=0)
    assert page.top_k_loss - page.full_loss < 0.01 * page.full_loss  # far student


@pytest.mark.parametrize("vocab_size", [32_000, 128_000])
def test_top_k_loss_exceeds_the_full_kl_by_about_minus_log_kept_mass(vocab_size):
    generator = torch.Generator().manual_seed(0)
    teacher = 8 * torch.randn(7, vocab_size, generator=generator)  # as the page's
    log_p_top, ids = page.top_k_teacher(teacher, page.TOP_K)
    kept = teacher.softmax(dim=-1).gather(-1, ids).sum(dim=-1)
    minus_log_kept = -kept.log().mean()
    for noise in (0.1, 0.01):  # near the teacher
        student = teacher + noise * torch.randn(teacher.shape, generator=generator)
        top_k = page.top_k_distillation_loss(student, log_p_top, ids)
        full = page.distillation_loss(student, teacher, 1.0)
        assert_close(top_k - full, minus_log_kept, rtol=0.3, atol=0)
    assert top_k - full > 10 * full  # near the teacher, the gap dominates
    # far from it: a random student, whose KL is about 10; the gap has grown
    student = torch.randn(teacher.shape, generator=generator)
    top_k = page.top_k_distillation_loss(student, log_p_top, ids)
    full = page.distillation_loss(student, teacher, 1.0)
    assert full > 5
    assert top_k - full > 3 * minus_log_kept
    assert top_k - full < 0.01 * full  # still negligible beside the KL


def test_liger_kernel_is_cited_at_a_commit_that_exists():
    source = inspect.getsource(page)
    assert "ead96b6" in source and "01ed383" not in source
