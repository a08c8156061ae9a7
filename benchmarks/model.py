"""Parameters, forward and training-step time per fusion strategy at 96³ (2 CT + 1 MR channels), CPU.

    python benchmarks/model.py [--size 96] [--repeats 3]

Baseline in the same run: MONAI's BasicUNet with the same input channels, classes and width.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.networks.nets import BasicUNet

from medfusion.models.network import MedFusionNet, NetConfig
from medfusion.text.encoders import Vocabulary

NOTES = [
    "Known melanoma. Rapid worsening over 2 weeks.",
    "No history of malignancy. Slowly progressive over 9 months.",
]


def time_it(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    n = args.size
    ct, mr = torch.randn(1, 2, n, n, n), torch.randn(1, 1, n, n, n)
    has = torch.tensor([True])
    vocab = Vocabulary.fit(NOTES, min_count=1)
    rows = []
    base = BasicUNet(3, 3, 4, features=(8, 16, 32, 64, 128, 8))
    opt_b = torch.optim.AdamW(base.parameters())
    x = torch.cat([ct, mr], 1)

    def base_step() -> None:
        opt_b.zero_grad()
        base(x).mean().backward()
        opt_b.step()

    with torch.inference_mode():
        fwd_b = time_it(lambda: base(x), args.repeats)
    rows.append(
        (
            "MONAI BasicUNet (baseline)",
            sum(p.numel() for p in base.parameters()),
            fwd_b,
            time_it(base_step, args.repeats),
        )
    )
    for fusion in ("spatial", "feature_concat", "feature_gated", "sequence", "film"):
        net = MedFusionNet(NetConfig(fusion=fusion), vocab)
        opt = torch.optim.AdamW(net.parameters())

        def step(net: MedFusionNet = net, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad()
            seg, sc = net(ct, mr, has, NOTES[:1])
            (seg.mean() + sc.mean()).backward()
            opt.step()

        net.eval()
        with torch.inference_mode():
            fwd = time_it(lambda net=net: net(ct, mr, has, NOTES[:1]), args.repeats)
        net.train()
        rows.append((fusion, sum(p.numel() for p in net.parameters()), fwd, time_it(step, args.repeats)))
    print(f"{n}³ input, batch 1, CPU {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'model':28s} {'params':>9s} {'forward s':>10s} {'train step s':>13s} {'step / baseline':>16s}")
    for name, p, f, s in rows:
        print(f"{name:28s} {p:9d} {f:10.3f} {s:13.3f} {s / rows[0][3]:16.2f}")


if __name__ == "__main__":
    main()
