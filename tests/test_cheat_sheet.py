"""Every row of the home page's cheat sheet computes what its first column says."""

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Normal, kl_divergence
from torch.testing import assert_close

from snippets.checked_kl import checked_kl
from snippets.large_vocab import chunked_kl

HOME = Path(__file__).resolve().parents[1] / "docs" / "index.md"
ROW = re.compile(
    r"^\| (?P<computes>[^|`]+?) \| `(?P<call>[^`]+)` \| (?P<remember>[^|]*)\|$", re.M
)
NAN_WITH_ZEROS = "NaN if P has zeros"
ESTIMATES = "estimated per sample of Q"  # rows whose mean over samples is the value
N_SAMPLES = 20_000
TEMPERATURE = 3.0


def cheat_sheet_rows():
    text = HOME.read_text()
    rows = ROW.findall(text)
    table_lines = [line for line in text.splitlines() if line.startswith("| ")]
    # every line of the table but its header is a row this test understands
    assert len(rows) == len(table_lines) - 1, (
        f"a cheat sheet row in {HOME} is malformed"
    )
    return rows


def example_tensors(with_zeros):
    """Four rows of distributions over five classes; optionally zeros in P."""
    generator = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(2, 4, 5, dtype=torch.float64, generator=generator)
    if with_zeros:
        logits_p[0, 2:] = -torch.inf  # masked classes: P = 0, log P = -inf
    log_p, log_q = logits_p.log_softmax(dim=-1), logits_q.log_softmax(dim=-1)
    # samples of Q, per row, and both log-probabilities of each
    x = torch.multinomial(log_q.exp(), N_SAMPLES, replacement=True, generator=generator)
    mu, logvar = torch.randn(2, 4, 3, dtype=torch.float64, generator=generator)
    return {
        "p": log_p.exp(),
        "log_p": log_p,
        "q": log_q.exp(),
        "log_q": log_q,
        "logits_p": logits_p,
        "logits_q": logits_q,
        "log_q_x": log_q.gather(-1, x),
        "log_p_x": log_p.gather(-1, x),
        "mu": mu,
        "logvar": logvar,
        "T": TEMPERATURE,
    }


def reference_values(p, q, logits_p, logits_q, mu, logvar, **_):
    """Each quantity written out from its definition, outcome by outcome."""

    def kl(a, b):
        return sum(ai * (ai / bi).log() for ai, bi in zip(a, b, strict=True) if ai > 0)

    def entropy(a):
        return -sum(ai * ai.log() for ai in a if ai > 0)

    kl_pq = torch.stack([kl(p_row, q_row) for p_row, q_row in zip(p, q, strict=True)])
    entropy_p = torch.stack([entropy(p_row) for p_row in p])
    return {
        "KL(P‖Q) of each row": kl_pq,
        "KL(P‖Q) summed over rows": kl_pq.sum(),
        "mean KL(P‖Q) over rows": kl_pq.mean(),
        "mean KL(P‖Q) over rows ÷ classes": kl_pq.mean() / p.size(-1),
        "KL(Q‖P) of each row": torch.stack(
            [kl(q_row, p_row) for p_row, q_row in zip(p, q, strict=True)]
        ),
        "H(P, Q) of each row": entropy_p + kl_pq,
        "H(P) of each row": entropy_p,
        "mean KL(P‖Q) over rows, from logits": kl_pq.mean(),
        "T² · mean KL(P_T‖Q_T) over rows": TEMPERATURE**2
        * torch.stack(
            [
                kl(p_row, q_row)
                for p_row, q_row in zip(
                    (logits_p / TEMPERATURE).softmax(-1),
                    (logits_q / TEMPERATURE).softmax(-1),
                    strict=True,
                )
            ]
        ).mean(),
        "KL(N(mu, exp(logvar))‖N(0, 1)) of each row": kl_divergence(
            Normal(mu, (logvar / 2).exp()), Normal(0.0, 1.0)
        ).sum(dim=-1),
        "KL(Q‖P), estimated per sample of Q": torch.stack(
            [kl(q_row, p_row) for p_row, q_row in zip(p, q, strict=True)]
        ),
    }


def evaluate(call, tensors):
    namespace = {"torch": torch, "F": F, "Categorical": Categorical}
    namespace |= {"kl_divergence": kl_divergence, "checked_kl": checked_kl}
    namespace |= {"chunked_kl": chunked_kl}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reduction="mean" warns; that row says so
        return eval(call, namespace | tensors)


@pytest.mark.parametrize("computes, call, remember", cheat_sheet_rows())
@pytest.mark.parametrize("with_zeros", [False, True], ids=["P>0", "P with zeros"])
def test_cheat_sheet_row_computes_what_it_says(computes, call, remember, with_zeros):
    tensors = example_tensors(with_zeros)
    expected = reference_values(**tensors)
    assert computes in expected, f"no reference value for {computes!r}: add one"
    result = evaluate(call, tensors)
    if with_zeros and NAN_WITH_ZEROS in remember:
        assert result.isnan().any(), f"{call} is said to give NaN here"
    elif ESTIMATES in computes:
        assert_unbiased(result, expected[computes])
    else:
        assert_close(result, expected[computes], rtol=1e-10, atol=1e-12)


def assert_unbiased(samples, expected):
    """The mean of each row's samples is that row's value, within 5 standard
    errors; an infinite value (P = 0 where Q > 0) gives infinite samples."""
    for row, value in zip(samples, expected, strict=True):
        if value.isinf():
            assert row.mean().isinf()
        else:
            standard_error = row.std() / len(row) ** 0.5
            assert abs(row.mean() - value) < 5 * standard_error + 1e-12


def test_xlogy_gradient_is_nan_where_p_is_zero_and_where_p_and_q_are_zero():
    p = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    (torch.xlogy(p, p) - torch.xlogy(p, q)).sum().backward()
    assert p.grad.isnan().tolist() == [True, True, False]
    assert q.grad.isnan().tolist() == [True, False, False]
