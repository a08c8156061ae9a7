"""Training on a GPU against the CPU, same recipe, same patients, same run; and the DDP paths a GPU has.

    python benchmarks/gpu_train.py [--cohort sample_data] [--steps 20] [--work /tmp/gpu-train]
                                   [--ways cuda:0,cuda:8,cpu:0]

1. The shipped recipe (pipelines/train_default.yaml: network, crop, batch, losses) on the cohort for
   two short epochs with the whole training loop — validation, diagnosis stage, package — each way
   DEVICE:LOADER_WORKERS (CUDA: bf16 autocast, as `medfusion train` does there; CPU: fp32, all cores;
   loader workers: processes making the batches ahead). The last way is the baseline. Printed: seconds
   per epoch (its steps plus validating the held-out patients) per way and the ratios; the package each
   wrote reloads. Steps 2 and 3 need CUDA; with CPU-only ways they are skipped.
2. `medfusion train --nproc-per-node N` with N above the number of GPUs must be refused before any
   process starts (NCCL refuses two ranks on one GPU).
3. DDP on NCCL (world size 1 on this one GPU): the network wrapped as the trainer wraps it, bf16
   steps, the broadcast and all_gather the trainer makes, on GPU tensors.
Ways on CUDA without a GPU: it says so and exits 0; CPU-only ways run anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


def recipe(cohort: Path, work: Path, device: str, steps: int, loader_workers: int = 0) -> dict:
    cfg = yaml.safe_load((ROOT / "pipelines" / "train_default.yaml").read_text())
    cfg["data"] = {
        "patients": str(cohort / "patients"),
        "labels": str(cohort / "labels"),
        "cache": str(work / "cache"),  # shared by both devices: registration is CPU work, done once
        "val_fraction": 0.3,
    }
    cfg["diagnosis"] = {"stack": True, "temperature_folds": 0}  # no note corpus travels with the repo
    cfg.update(epochs=2, steps_per_epoch=steps, device=device, workers=8, threads=torch.get_num_threads())
    cfg["loader_workers"] = loader_workers
    return cfg


def train_on(cohort: Path, work: Path, device: str, steps: int, loader_workers: int) -> list[float]:
    from medfusion.package import load_package
    from medfusion.train.config import TrainConfig
    from medfusion.train.loop import train

    out = work / f"{device}-{loader_workers}"
    summary = train(TrainConfig.model_validate(recipe(cohort, work, device, steps, loader_workers)), out)
    load_package(summary["package"], torch.device(device))
    log = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines() if '"epoch"' in x]
    print(
        f"{device}, {loader_workers} loader workers: "
        + ", ".join(f"epoch {r['epoch']} loss {r['loss']:.3f} {r['seconds']} s" for r in log)
    )
    return [float(r["seconds"]) for r in log]


def refuse_more_ranks_than_gpus(cohort: Path, work: Path) -> None:
    n = torch.cuda.device_count()
    path = work / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe(cohort, work, "cuda", 2)))
    cmd = [sys.executable, "-m", "medfusion.cli", "train", "--config", str(path), "--out", str(work / "ddp")]
    res = subprocess.run([*cmd, "--nproc-per-node", str(n + 1)], capture_output=True, text=True, timeout=120)
    msg = (res.stdout + res.stderr).strip().splitlines()
    print(f"--nproc-per-node {n + 1} on {n} GPU(s): exit {res.returncode}: {msg[-1] if msg else ''}")
    assert res.returncode == 2 and "CUDA device" in (res.stdout + res.stderr)


def nccl_ddp_smoke() -> None:
    import torch.distributed as dist

    from medfusion.models.network import MedFusionNet, NetConfig
    from medfusion.text.encoders import Vocabulary

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", rank=0, world_size=1)
    cfg = yaml.safe_load((ROOT / "pipelines" / "train_default.yaml").read_text())["network"]
    notes = ["Known melanoma. Rapid worsening.", "No history of malignancy."]
    net = MedFusionNet(NetConfig(**cfg), Vocabulary.fit(notes, min_count=1)).to(dev)
    net = net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[0], find_unused_parameters=True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ct = torch.randn(2, 2, 48, 64, 64, device=dev).to(memory_format=torch.channels_last_3d)
    mr = torch.randn(2, 1, 48, 64, 64, device=dev).to(memory_format=torch.channels_last_3d)
    has = torch.ones(2, dtype=torch.bool, device=dev)
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            seg, sc = ddp(ct, mr, has, notes)
            loss = seg.float().square().mean() + sc.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    flag = torch.tensor([3], dtype=torch.long, device=dev)
    dist.broadcast(flag, 0)
    total = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum().reshape(1)
    sums = [torch.zeros(1, dtype=torch.float64, device=total.device)]
    dist.all_gather(sums, total)
    dist.destroy_process_group()
    finite = all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    print(
        f"NCCL DDP (world 1): losses {[round(x, 4) for x in losses]}, grads finite {finite}, sum {float(sums[0]):.3f}"
    )
    assert finite and losses[-1] < losses[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cohort", type=Path, default=ROOT / "sample_data")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-train"))
    ap.add_argument("--ways", default="cuda:0,cuda:8,cpu:0")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if "cuda" in args.ways and not cuda:
        print("no CUDA device: nothing to measure (CPU-only: --ways cpu:0,cpu:1)")
        return
    os.environ["MEDFUSION_QUIET"] = "1"
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{name} · torch {torch.__version__} · {torch.get_num_threads()} CPU threads")
    ways = [(w.split(":")[0], int(w.split(":")[1])) for w in args.ways.split(",")]
    secs = {w: train_on(args.cohort, args.work, w[0], args.steps, w[1]) for w in ways}
    base = secs[ways[-1]][-1]
    # the first epoch carries cuDNN's autotuning and the CUDA context: compare the second
    print(f"seconds per epoch ({args.steps} steps + validation), second epoch:")
    for (dev, lw), s in secs.items():
        print(
            f"  {dev:5s} {lw} loader workers  {s[-1]:6.1f} s  baseline/way {base / s[-1]:5.2f}×  (first {s[0]:.1f} s)"
        )
    if cuda:
        refuse_more_ranks_than_gpus(args.cohort, args.work)
        nccl_ddp_smoke()


if __name__ == "__main__":
    main()
