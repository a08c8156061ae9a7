"""Which torch device a process computes on: the one rule for `auto` and the one check that a
requested device exists, shared by inference, training and the CLI; and SimpleITK's thread count,
which inference and the training cache set alike (`repeatable_registration`)."""

from __future__ import annotations

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """The torch device for a device name.

    Args:
        requested: ``"auto"`` (CUDA, then Apple MPS, then the CPU: the first available), or a torch device
            name: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.

    Returns:
        The device; for ``"cuda"`` without an index, CUDA's current device.

    Raises:
        ValueError: the name is not a device name, CUDA was asked for on a machine without it, or
            ``cuda:N`` names a GPU this machine does not have (the message says how many it has).

    Examples:
        >>> pick_device("cpu")
        device(type='cpu')
    """
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError as exc:
        msg = f"device {requested!r} is not a device name (auto, cpu, cuda, cuda:N, mps)"
        raise ValueError(msg) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {requested!r} requested but CUDA is not available"
        raise ValueError(msg)
    n_gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cuda" and dev.index is not None and dev.index >= n_gpus:
        msg = f"device {requested!r} requested but this machine has {n_gpus} CUDA device(s)"
        raise ValueError(msg)
    return dev


def repeatable_registration() -> None:
    """Run SimpleITK on one thread, process-wide, so that a seeded registration repeats bit for bit.

    ITK's Mattes mutual information sums its joint histogram from several threads in whatever order
    they finish: on 2 threads the same registration of one small synthetic pair moved by up to 0.12 mm
    (0.0076 in a matrix entry) from one call to the next, on one thread not at all, for 1.25× its time
    (benchmarks/registration_threads.py, RESULTS.md "Registration on one thread"). Inference
    (`infer.predictor.deterministic_torch`) and the training cache (`train.data`) both call this, so
    that a case is registered alike wherever it is prepared.
    """
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
