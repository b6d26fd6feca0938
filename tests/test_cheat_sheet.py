"""Every row of the home page's cheat sheet computes what its first column says."""

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence
from torch.testing import assert_close

from snippets.checked_kl import checked_kl

HOME = Path(__file__).resolve().parents[1] / "docs" / "index.md"
ROW = re.compile(
    r"^\| (?P<computes>[^|`]+?) \| `(?P<call>[^`]+)` \| (?P<remember>[^|]*)\|$", re.M
)
NAN_WITH_ZEROS = "NaN if P has zeros"


def cheat_sheet_rows():
    rows = ROW.findall(HOME.read_text())
    assert rows, f"no cheat sheet rows found in {HOME}"
    return rows


def example_tensors(with_zeros):
    """Four rows of distributions over five classes; optionally zeros in P."""
    generator = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(2, 4, 5, dtype=torch.float64, generator=generator)
    if with_zeros:
        logits_p[0, 2:] = -torch.inf  # masked classes: P = 0, log P = -inf
    return {
        "p": logits_p.softmax(dim=-1),
        "log_p": logits_p.log_softmax(dim=-1),
        "q": logits_q.softmax(dim=-1),
        "log_q": logits_q.log_softmax(dim=-1),
        "logits_q": logits_q,
    }


def reference_values(p, q):
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
    }


def evaluate(call, tensors):
    namespace = {"torch": torch, "F": F, "Categorical": Categorical}
    namespace |= {"kl_divergence": kl_divergence, "checked_kl": checked_kl}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reduction="mean" warns; that row says so
        return eval(call, namespace | tensors)


@pytest.mark.parametrize("computes, call, remember", cheat_sheet_rows())
@pytest.mark.parametrize("with_zeros", [False, True], ids=["P>0", "P with zeros"])
def test_cheat_sheet_row_computes_what_it_says(computes, call, remember, with_zeros):
    tensors = example_tensors(with_zeros)
    expected = reference_values(tensors["p"], tensors["q"])
    assert computes in expected, f"no reference value for {computes!r}: add one"
    result = evaluate(call, tensors)
    if with_zeros and NAN_WITH_ZEROS in remember:
        assert result.isnan().any(), f"{call} is said to give NaN here"
    else:
        assert_close(result, expected[computes], rtol=1e-10, atol=1e-12)
