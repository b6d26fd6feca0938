# %% [markdown]
# # KL over a large vocabulary, in chunks
#
# Distilling a language model compares two (tokens, vocabulary) tables of logits,
# with a vocabulary of 128,000 entries or so. The straightforward loss,
# `F.kl_div(log_softmax(student), log_softmax(teacher), log_target=True)`,
# allocates several tensors the size of those tables across its forward and
# backward passes. A chunked KL takes the rows a few at a time and writes the
# gradient in closed form: the same value and the same gradients, and no
# table-sized tensor besides the gradient it has to return.
#
# On this page you will count what each version allocates, write the chunked
# version as a `torch.autograd.Function`, and check it against `F.kl_div`. How
# much memory and time it saves on a real vocabulary is measured by the
# repository's benchmark (`make bench`), not on this page.

# %% [markdown]
# ## The straightforward version

# %%
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SEED = 0


def straightforward_kl(student_logits, teacher_logits):
    """Mean over rows of KL(teacher ‖ student), each row a distribution."""
    log_q = student_logits.log_softmax(dim=-1)
    log_p = teacher_logits.log_softmax(dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


# %% [markdown]
# ## Counting what it allocates
#
# A `TorchDispatchMode` sees every operation PyTorch runs, the backward pass's
# included. The one below counts the results that are new tensors (not views of
# an input) as large as the logits: log-softmax twice, then each elementwise step
# of `exp(target) * (target - input)`, then the backward through them.


# %%
class CountLargeAllocations(TorchDispatchMode):
    """Counts operation results of ``numel`` elements that are new tensors."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.operations = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {
            tensor.untyped_storage().data_ptr()
            for tensor in tree_flatten((args, kwargs))[0]
            if isinstance(tensor, torch.Tensor)
        }
        for tensor in tree_flatten(result)[0]:
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.numel() == self.numel
                and tensor.untyped_storage().data_ptr() not in inputs
            ):
                self.operations.append(str(func))
        return result


def large_allocations(loss_fn, n_rows=64, vocab_size=4096):
    """The operations of a forward and backward pass that create logits-sized
    tensors, for student logits that need a gradient and a fixed teacher."""
    generator = torch.Generator().manual_seed(SEED)
    student = torch.randn(n_rows, vocab_size, generator=generator, requires_grad=True)
    teacher = torch.randn(n_rows, vocab_size, generator=generator)
    with CountLargeAllocations(n_rows * vocab_size) as counter:
        loss_fn(student, teacher).backward()
    return counter.operations


# %% active="ipynb"
# straightforward_allocations = large_allocations(straightforward_kl)
# print(f"{len(straightforward_allocations)} logits-sized tensors:")
# print("\n".join(straightforward_allocations))

# %% [markdown]
# ## The chunked version
#
# For a row with student log-probabilities $\log q$ and teacher $\log p$, the KL is
# $\sum_i p_i (\log p_i - \log q_i)$ and its gradients with respect to the logits
# have closed forms:
#
# $$\frac{\partial\, D_{\mathrm{KL}}}{\partial s_i} = q_i - p_i, \qquad
#   \frac{\partial\, D_{\mathrm{KL}}}{\partial t_i}
#   = p_i\big(\log p_i - \log q_i - D_{\mathrm{KL}}\big).$$
#
# So the forward pass keeps its inputs and three numbers per row (the two
# log-normalisers and the row's KL), and the backward pass recomputes each chunk's
# probabilities and writes that chunk of the gradient: the temporaries are
# (chunk, vocabulary) in size. Half-precision logits are processed in float32, and
# a teacher logit masked with $-\infty$ contributes 0 instead of the NaN that
# `F.kl_div(..., log_target=True)` returns for it (see
# [numerical pitfalls](numerical_pitfalls.py)).


# %%
class ChunkedKL(torch.autograd.Function):
    """Mean over rows of KL(softmax(teacher) ‖ softmax(student)), by row chunks."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, chunk_size):
        working = torch.promote_types(
            torch.promote_types(student_logits.dtype, teacher_logits.dtype),
            torch.float32,
        )
        n_rows = student_logits.size(0)
        per_row = torch.empty(3, n_rows, dtype=working, device=student_logits.device)
        lse_s, lse_t, kl_rows = per_row
        for rows in row_chunks(n_rows, chunk_size):
            s = student_logits[rows].to(working)
            t = teacher_logits[rows].to(working)
            lse_s[rows], lse_t[rows] = s.logsumexp(dim=-1), t.logsumexp(dim=-1)
            p = (t - lse_t[rows, None]).exp_()
            # KL = Σ p (log p − log q) = Σ p (t − s) − lse_t + lse_s, since Σ p = 1;
            # a masked teacher logit (t = −inf, p = 0) contributes 0, not 0 · inf
            t_minus_s = (t - s).masked_fill_(t == -torch.inf, 0.0)
            kl_rows[rows] = (p * t_minus_s).sum(dim=-1) - lse_t[rows] + lse_s[rows]
        ctx.save_for_backward(student_logits, teacher_logits, lse_s, lse_t, kl_rows)
        ctx.chunk_size = chunk_size
        return kl_rows.sum() / n_rows

    @staticmethod
    def backward(ctx, grad_output):
        student_logits, teacher_logits, lse_s, lse_t, kl_rows = ctx.saved_tensors
        working = lse_s.dtype
        scale = grad_output / student_logits.size(0)  # the mean over rows
        grad_student = grad_teacher = None
        if ctx.needs_input_grad[0]:
            grad_student = torch.empty_like(student_logits)
        if ctx.needs_input_grad[1]:
            grad_teacher = torch.empty_like(teacher_logits)
        for rows in row_chunks(student_logits.size(0), ctx.chunk_size):
            s = student_logits[rows].to(working)
            t = teacher_logits[rows].to(working)
            log_p = t - lse_t[rows, None]
            p = log_p.exp()
            if grad_teacher is not None:  # ∂KL/∂t = p (log p − log q − KL)
                log_ratio = log_p.sub_(s).add_(lse_s[rows, None])
                log_ratio.sub_(kl_rows[rows, None]).masked_fill_(t == -torch.inf, 0.0)
                grad_teacher[rows] = log_ratio.mul_(p).mul_(scale)
            if grad_student is not None:  # ∂KL/∂s = q − p
                q = (s - lse_s[rows, None]).exp_()
                grad_student[rows] = q.sub_(p).mul_(scale)
        return grad_student, grad_teacher, None


def row_chunks(n_rows, chunk_size):
    return [slice(start, start + chunk_size) for start in range(0, n_rows, chunk_size)]


CHUNK_VALUES = 1 << 20  # a million values per temporary: 4 MB in float32


def chunked_kl(student_logits, teacher_logits, chunk_size=None):
    """Mean over rows of KL(teacher ‖ student), ``chunk_size`` rows at a time (by
    default as many rows as make about CHUNK_VALUES values)."""
    if chunk_size is None:
        chunk_size = max(1, CHUNK_VALUES // student_logits.size(-1))
    return ChunkedKL.apply(student_logits, teacher_logits, chunk_size)


# %% active="ipynb"
# chunked_allocations = large_allocations(lambda s, t: chunked_kl(s, t, chunk_size=8))
# print(f"{len(chunked_allocations)} logits-sized tensor:", *chunked_allocations)

# %% [markdown]
# ## The same value, the same gradients
#
# On logits with a row count the chunk size does not divide, and with a teacher
# that needs a gradient too (as in mutual learning), both versions agree to
# float32 precision; `torch.autograd.gradcheck` confirms the hand-written backward
# in float64 against finite differences.

# %%
generator = torch.Generator().manual_seed(SEED)
n_rows, vocab_size = 37, 1000
student = 3 * torch.randn(n_rows, vocab_size, generator=generator)
teacher = 3 * torch.randn(n_rows, vocab_size, generator=generator)


def value_and_gradients(loss_fn):
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss = loss_fn(s, t)
    return (loss, *torch.autograd.grad(loss, (s, t)))


reference = value_and_gradients(straightforward_kl)
chunked = value_and_gradients(lambda s, t: chunked_kl(s, t, chunk_size=8))
relative_differences = [
    ((a - b).abs().max() / b.abs().max()).item()
    for a, b in zip(chunked, reference, strict=True)
]
small_double = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)
small_double = [logits.requires_grad_() for logits in small_double]
gradcheck_passed = torch.autograd.gradcheck(
    lambda s, t: chunked_kl(s, t, chunk_size=2), small_double
)

# %% active="ipynb"
# for name, difference in zip(["value", "d/dstudent", "d/dteacher"],
#                             relative_differences):
#     print(f"{name:>11}: largest relative difference {difference:.1e}")
# print("gradcheck:", gradcheck_passed)

# %% [markdown]
# ## Where fused kernels go further
#
# Chunking keeps the loss from multiplying the memory of the logits, but the
# logits themselves, and the gradient the loss returns, are still tables of
# (tokens, vocabulary). On GPUs, [Liger-Kernel]'s Triton kernels go further:
# `LigerFusedLinearJSD` takes the last hidden states and the output layer's
# weights instead of logits, computes the logits chunk by chunk inside the loss
# and writes the gradients in the same pass, so the full table of logits never
# exists; its generalised Jensen–Shannon divergence has the forward and reverse
# KL as its two extreme settings.
#
# [Liger-Kernel]: https://github.com/linkedin/Liger-Kernel
#
# ## What to remember
#
# - The straightforward KL of two logit tables allocates several more tables of
#   the same size; with a 128k vocabulary those set the peak memory
#   (`make bench` measures it).
# - Chunk over rows, recompute in the backward pass, and use the closed-form
#   gradients $q - p$ (student) and $p(\log p - \log q - D_{\mathrm{KL}})$
#   (teacher).
# - Check a hand-written backward with `torch.autograd.gradcheck` in float64.
