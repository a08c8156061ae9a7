"""Forward/backward timing of the network on CUDA (bf16 autocast, channels_last_3d), when a GPU exists.

    python benchmarks/gpu_smoke.py [--size 96] [--batch 2]

Prints throughput (voxels/s) and peak memory per fusion strategy, with the same network in fp32
as the baseline in the same run. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medfusion.models.network import MedFusionNet, NetConfig
from medfusion.text.encoders import Vocabulary

NOTES = ["Known melanoma. Rapid worsening over 2 weeks.", "No history of malignancy. Slowly progressive."]


def bench(
    net: MedFusionNet, ct: torch.Tensor, mr: torch.Tensor, amp: bool, repeats: int = 10
) -> tuple[float, float]:
    opt = torch.optim.AdamW(net.parameters())
    has = torch.ones(ct.shape[0], dtype=torch.bool, device=ct.device)
    notes = (NOTES * ct.shape[0])[: ct.shape[0]]
    ts = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            seg, sc = net(ct, mr, has, notes)
            loss = seg.float().mean() + sc.float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        if i >= 2:
            ts.append(time.perf_counter() - t)
    return statistics.median(ts), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    dev = torch.device("cuda")
    n = args.size
    ct = torch.randn(args.batch, 2, n, n, n, device=dev).to(memory_format=torch.channels_last_3d)
    mr = torch.randn(args.batch, 1, n, n, n, device=dev).to(memory_format=torch.channels_last_3d)
    vocab = Vocabulary.fit(NOTES, min_count=1)
    print(f"{torch.cuda.get_device_name()} · {args.batch}×{n}³ · forward+backward+step")
    for fusion in ("spatial", "feature_concat", "feature_gated", "sequence", "film"):
        net = MedFusionNet(NetConfig(fusion=fusion), vocab).to(dev).to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        t32, m32 = bench(net, ct, mr, amp=False)
        tbf, mbf = bench(net, ct, mr, amp=True)
        vox = args.batch * n**3
        print(
            f"{fusion:15s} fp32 {vox / t32 / 1e6:8.1f} Mvox/s {m32:5.2f} GiB | bf16 {vox / tbf / 1e6:8.1f} Mvox/s {mbf:5.2f} GiB | speed-up {t32 / tbf:.2f}×"
        )


if __name__ == "__main__":
    main()
