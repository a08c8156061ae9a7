"""A training run's weights on disk: the best weights so far (OUT/best.safetensors) and the resumable
checkpoint (OUT/checkpoint/: weights, optimiser state, {epoch, best, bad}), written atomically and read
back into a network that may have gained the late-fusion parts since."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medfusion.io.atomic import atomic_path, write_json
from medfusion.models.network import MedFusionNet

# state keys fitted by the diagnosis stage (network.note_head, network.measures), absent from checkpoints
# made without them
LATE_FUSION_KEYS = ("note_text.", "note_logit.", "note_scale", "head_gain", "head_bias", "measure_")


def save_weights(model: MedFusionNet, path: Path) -> None:
    """The model's whole state (parameters and buffers) as safetensors at `path`, written atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))


def load_weights(model: MedFusionNet, path: Path) -> None:
    """Load the safetensors state at `path` into `model`; a note head or measurement term absent from it
    (a run from before `network.note_head` / `network.measures`) keeps its fresh initialisation and is
    fitted by the diagnosis stage.

    Raises:
        RuntimeError: other keys are missing, or the file holds keys the network does not have.
    """
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    absent = [k for k in missing if not k.startswith(LATE_FUSION_KEYS)]
    if absent or unexpected:
        msg = f"{path}: weights do not fit the network (missing {absent[:3]}, unexpected {unexpected[:3]})"
        raise RuntimeError(msg)
    if missing:
        print(
            f"{path}: no {'note head' if any(k.startswith('note_') for k in missing) else 'measurement term'} stored; it starts fresh"
        )


def save_checkpoint(
    folder: Path, model: MedFusionNet, opt: torch.optim.Optimizer, epoch: int, best: float, bad: int
) -> None:
    """`folder` (OUT/checkpoint, created): model.safetensors, optimizer.pt and state.json {epoch (the last
    finished, from 0), best (its selection score), bad (epochs since the best)} for --resume."""
    folder.mkdir(exist_ok=True)
    save_weights(model, folder / "model.safetensors")
    with atomic_path(folder / "optimizer.pt") as tmp:
        torch.save(opt.state_dict(), tmp)
    write_json(folder / "state.json", {"epoch": epoch, "best": best, "bad": bad})


def load_checkpoint(folder: Path, model: MedFusionNet, opt: torch.optim.Optimizer) -> tuple[int, float, int]:
    """Load `save_checkpoint`'s weights and optimiser state from `folder` into `model` and `opt`; an
    optimiser state that does not fit (the network gained parameters since) is left fresh, with a
    printed line.

    Returns:
        (the epoch to start from, best selection score so far, epochs since the best).

    Raises:
        RuntimeError: the weights do not fit the network (`load_weights`).
        FileNotFoundError: a checkpoint file is missing.
    """
    load_weights(model, folder / "model.safetensors")
    state = json.loads((folder / "state.json").read_text())
    try:
        opt.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    except ValueError:  # the network gained parameters (a note head) since the checkpoint
        print(f"{folder}: optimizer state does not fit the network; its moments start afresh")
    return state["epoch"] + 1, state["best"], state["bad"]
