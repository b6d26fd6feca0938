"""Claims of the page "Knowledge distillation: temperature and the T² factor"."""

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from snippets import distillation as page

FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}


def test_teacher_as_probabilities_or_log_probabilities_gives_the_same_loss():
    assert_close(page.with_log_target, page.with_probabilities, **FLOAT32)


def test_loss_is_t_squared_times_the_mean_kl_per_example():
    t = page.temperature
    p = F.softmax(page.teacher_logits / t, dim=-1)
    q = F.softmax(page.student_logits / t, dim=-1)
    kl_per_example = (p * (p.log() - q.log())).sum(dim=-1)
    assert_close(page.with_log_target, t**2 * kl_per_example.mean(), **FLOAT32)


def test_teacher_gets_no_gradient():
    teacher = page.teacher_logits.clone().requires_grad_()
    student = page.student_logits.clone().requires_grad_()
    page.distillation_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_combined_loss_mixes_distillation_and_cross_entropy():
    cross_entropy = F.cross_entropy(page.student_logits, page.labels)
    expected = page.alpha * page.with_log_target + (1 - page.alpha) * cross_entropy
    assert_close(page.total_loss, expected, **FLOAT32)


def test_without_t_squared_the_gradient_shrinks_as_one_over_t_squared():
    plain = torch.tensor(page.gradient_norms[False])
    t = torch.tensor(page.TEMPERATURES)
    scaled_back = plain * t**2
    # for large T the product settles: 1/T² is the rate
    assert_close(scaled_back[-1], scaled_back[-2], rtol=0.02, atol=0)
    assert (plain.diff() < 0).all()


def test_with_t_squared_the_gradient_norm_stays_within_a_factor_of_two():
    scaled = torch.tensor(page.gradient_norms[True])
    assert scaled.max() / scaled.min() < 2
    assert_close(scaled[-1], scaled[-2], rtol=0.02, atol=0)  # constant for large T
    plain = torch.tensor(page.gradient_norms[False])
    assert plain.max() / plain.min() > 1000


def test_soft_target_cross_entropy_has_the_same_student_gradient_as_the_kl():
    t = page.temperature
    soft_targets = F.softmax(page.teacher_logits / t, dim=-1)
    student = page.student_logits.clone().requires_grad_()
    cross_entropy = F.cross_entropy(student / t, soft_targets) * t**2
    (from_cross_entropy,) = torch.autograd.grad(cross_entropy, student)
    student = page.student_logits.clone().requires_grad_()
    kl = page.distillation_loss(student, page.teacher_logits, t)
    (from_kl,) = torch.autograd.grad(kl, student)
    assert_close(from_cross_entropy, from_kl, **FLOAT32)
    assert cross_entropy > kl  # they differ by the teacher's entropy (times T²)
