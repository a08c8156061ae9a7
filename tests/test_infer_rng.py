"""MC dropout's random streams: seeded per case, and every state it touches restored afterwards."""

from __future__ import annotations

import pytest
import torch

from medfusion.infer.predictor import mc_dropout_rng


def _draws(device: torch.device) -> torch.Tensor:
    return torch.nn.functional.dropout(torch.ones(64, device=device), 0.5, training=True).cpu()


@pytest.mark.parametrize(
    "name",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_mc_dropout_rng_is_seeded_and_leaves_every_stream_as_it_was(name: str) -> None:
    dev = torch.device(name)
    torch.manual_seed(123)
    cpu_before = torch.get_rng_state()
    cuda_before = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    with mc_dropout_rng(dev, 7):
        first = _draws(dev)
    with mc_dropout_rng(dev, 7):
        again = _draws(dev)
    with mc_dropout_rng(dev, 8):
        other = _draws(dev)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), cpu_before)
    if torch.cuda.is_available():  # every device's stream, not only the one in use
        assert all(
            torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_before, strict=True)
        )
