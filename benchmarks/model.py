"""Parameters, forward and training-step time per fusion strategy at 96³ (2 CT + 1 MR channels), CPU.

    python benchmarks/model.py [--size 96] [--repeats 3]

Baseline in the same run: MONAI's BasicUNet with the same input channels, classes and width (in both
memory layouts). Fusion rows use channels_last_3d, as training and inference do; one row repeats
`sequence` in the default contiguous layout and one with a single convolution per residual unit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.networks.nets import BasicUNet

from medfusion.models.network import MedFusionNet, NetConfig, channels_last
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
    ap.add_argument("--only", nargs="*", help="run only the fusion variants whose name contains one of these")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.size
    ct, mr = torch.randn(1, 2, n, n, n), torch.randn(1, 1, n, n, n)
    has = torch.tensor([True])
    vocab = Vocabulary.fit(NOTES, min_count=1)
    rows = []
    x = torch.cat([ct, mr], 1)

    def add(name: str, net: torch.nn.Module, layout: bool, fwd_fn, step_fn) -> None:  # type: ignore[no-untyped-def]
        net.eval()
        with torch.inference_mode():
            fwd = time_it(fwd_fn, args.repeats)
        net.train()
        rows.append((name, sum(p.numel() for p in net.parameters()), fwd, time_it(step_fn, args.repeats)))

    for layout in (False, True):
        base = BasicUNet(3, 3, 4, features=(8, 16, 32, 64, 128, 8))
        xb = channels_last(x) if layout else x
        if layout:
            base = base.to(memory_format=torch.channels_last_3d)
        opt_b = torch.optim.AdamW(base.parameters())

        def base_step(
            base: torch.nn.Module = base, opt_b: torch.optim.Optimizer = opt_b, xb: torch.Tensor = xb
        ) -> None:
            opt_b.zero_grad()
            base(xb).mean().backward()
            opt_b.step()

        name = "MONAI BasicUNet" + (", channels_last" if layout else " (baseline)")
        add(name, base, layout, lambda base=base, xb=xb: base(xb), base_step)

    variants = [
        (f, {"fusion": f}, True) for f in ("spatial", "feature_concat", "feature_gated", "sequence", "film")
    ]
    variants += [("sequence, contiguous", {"fusion": "sequence"}, False)]
    variants += [("sequence, subunits 1", {"fusion": "sequence", "subunits": 1}, True)]
    variants += [
        (
            "sequence, subunits 1, 4-8-16-32",
            {"fusion": "sequence", "subunits": 1, "channels": [4, 8, 16, 32]},
            True,
        )
    ]
    if args.only:
        variants = [v for v in variants if any(o in v[0] for o in args.only)]
    for name, kw, layout in variants:
        net = MedFusionNet(NetConfig(**kw), vocab)
        c, m = (channels_last(ct), channels_last(mr)) if layout else (ct, mr)
        if layout:
            net = net.to(memory_format=torch.channels_last_3d)
        opt = torch.optim.AdamW(net.parameters())

        def step(
            net: MedFusionNet = net,
            opt: torch.optim.Optimizer = opt,
            c: torch.Tensor = c,
            m: torch.Tensor = m,
        ) -> None:
            opt.zero_grad()
            seg, sc = net(c, m, has, NOTES[:1])
            (seg.mean() + sc.mean()).backward()
            opt.step()

        add(name, net, layout, lambda net=net, c=c, m=m: net(c, m, has, NOTES[:1]), step)
    print(f"{n}³ input, batch 1, CPU {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'model':34s} {'params':>9s} {'forward s':>10s} {'train step s':>13s} {'step / baseline':>16s}")
    for name, p, f, s in rows:
        print(f"{name:34s} {p:9d} {f:10.3f} {s:13.3f} {s / rows[0][3]:16.2f}")


if __name__ == "__main__":
    main()
