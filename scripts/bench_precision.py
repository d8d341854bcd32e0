#!/usr/bin/env python
"""Training step time of the segmenters in float32 against bfloat16 CPU autocast, measured in one run.

The reference is the same network in float32 (a copy of the same initial weights), stepped with the same loss
(:class:`bundle.networks.WeightedDiceBCELoss`), AdamW and random batch; the bfloat16 side only swaps the inferer for
:class:`bundle.networks.AutocastInferer` (the training inferer of ``configs/train.yaml`` and ``configs/pretrain.yaml``).
The two run interleaved, one step each in turn, so that both see the same machine load; the ratio float32 time /
bfloat16 time is the speed-up. The loss of both after the same steps is printed too: bfloat16 may not change what
the network learns.

    python scripts/bench_precision.py                      # SegResNet, 3 channels, batch 8 at 128 px, 1 thread
    python scripts/bench_precision.py --arch unet --channels 14 --batch_size 16    # the pre-training shape, UNet

On a CPU without native bfloat16 (:func:`bundle.networks.cpu_bf16_supported` is False) the configs train in float32
and this script reports the (slower) emulated autocast for information.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="segresnet")
    ap.add_argument("--channels", type=int, default=3, help="output channels (3: SCR; 14: DoLL pre-training)")
    ap.add_argument("--image_size", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="timed steps on each side (after 3 warm-up steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the pipeline's runs use 1 each, 2 at once)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    import torch

    from bundle.networks import AutocastInferer, WeightedDiceBCELoss, build_segmenter, cpu_bf16_supported

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    net32 = build_segmenter(args.arch, out_channels=args.channels)
    net16 = copy.deepcopy(net32)
    sides = {
        "float32": (net32, AutocastInferer(enabled=False), torch.optim.AdamW(net32.parameters(), 1e-3)),
        "bfloat16": (net16, AutocastInferer(enabled=True), torch.optim.AdamW(net16.parameters(), 1e-3)),
    }
    loss_fn = WeightedDiceBCELoss()
    gen = torch.Generator().manual_seed(0)
    s = args.image_size
    times = {k: 0.0 for k in sides}
    losses = {k: 0.0 for k in sides}
    for step in range(3 + args.steps):
        x = torch.randn(args.batch_size, 1, s, s, generator=gen)
        y = (torch.rand(args.batch_size, args.channels, s, s, generator=gen) > 0.7).float()
        for name, (net, inferer, opt) in sides.items():
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(inferer(x, net), y)
            loss.backward()
            opt.step()
            if step >= 3:
                times[name] += time.perf_counter() - t
            losses[name] = loss.item()
    result = {"arch": args.arch, "channels": args.channels, "image_size": s, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "native_bf16": cpu_bf16_supported(),
              "float32_s_per_step": times["float32"] / args.steps, "bfloat16_s_per_step": times["bfloat16"] / args.steps,
              "speedup": times["float32"] / times["bfloat16"],
              "loss_float32": losses["float32"], "loss_bfloat16": losses["bfloat16"]}
    print(f"{args.arch}, {args.channels} channels, batch {args.batch_size} at {s} px, {result['threads']} thread(s), "
          f"native bfloat16: {result['native_bf16']}")
    print(f"float32  : {result['float32_s_per_step']:.3f} s/step   loss after {3 + args.steps} steps "
          f"{result['loss_float32']:.4f}")
    print(f"bfloat16 : {result['bfloat16_s_per_step']:.3f} s/step   loss after {3 + args.steps} steps "
          f"{result['loss_bfloat16']:.4f}")
    print(f"speed-up : {result['speedup']:.2f}x (float32 time / bfloat16 time, interleaved in one run)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
