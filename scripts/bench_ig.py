#!/usr/bin/env python
"""Benchmark: multi-target Integrated Gradients engine against captum's per-target loop, in ONE process.

Network: MONAI DenseNet121 (2D, 1 input channel, 14 outputs, random init, eval mode). Per image, interleaved:

* ``captum``: ``captum.attr.IntegratedGradients.attribute(x, target=c, n_steps, method, internal_batch_size=steps,
  return_convergence_delta=True)`` once per target ``c`` (all ``--targets`` targets);
* ``engine``: :class:`bundle.explain.ig.MultiTargetIntegratedGradients` with the same targets, steps, method and
  ``internal_batch_size`` (identical work), plus ``engine/ibs=N`` variants (``--engine-ibs``);
* DoLL mode: ``--selected K`` targets per image (a typical number of positive findings): the engine on them, and
  captum on the same K targets (both ratios are printed: against captum over all targets and over the same K).

Batch mode (``--doll-batch B ...``): images/s of the DoLL stage's inferer
(:class:`bundle.doll.inferer.DoLLInferer`: the ensemble's probabilities, then IG of ``--doll-classifiers``
DenseNet121s for ``--selected`` labelled targets per image, batched across images and targets, and the
post-processing of ``configs/generate_doll.yaml``) at each batch size, with the FLOPs it did (``classifiers x
images x steps x (1 + targets) x forward``, input-gradient backward counted as one forward), the GFLOP/s reached
and, from them, the images/s an accelerator sustaining ``--gpu-tflops`` effective TFLOP/s would give. Prints a
table and one ``DOLL_BATCH_JSON {...}`` line; the captum comparison is skipped.

Attributions are checked for equality (max abs difference relative to captum's max abs value). Reported: seconds
per image by wall clock and by process CPU time (the latter is less disturbed by other processes on a shared
machine), ratios, peak memory per variant (a separate untimed pass: CPU peak RSS above the start, after
``malloc_trim`` and a reset of the peak mark through ``/proc/self/clear_refs``; CUDA:
``torch.cuda.max_memory_allocated``), the machine's matmul GFLOP/s measured in
the same run and the fraction of it reached, counting conv + linear FLOPs of one forward pass (input-gradient
backward taken as the same count): captum ``2 x T x steps x F``, engine floor ``steps x (1 + T) x F``.

glibc's allocator returns memory to the OS too eagerly for this workload (page faults cost ~1/5 of the time); the
script re-executes itself with ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` and ``MALLOC_MMAP_THRESHOLD_`` set
unless they are already set or ``--no-malloc-tune`` is given.

Examples::

    .venv/bin/python scripts/bench_ig.py                 # 224 x 224, 14 targets x 32 steps, 1 image (~6-10 min)
    .venv/bin/python scripts/bench_ig.py --quick         # 96 x 96, 8 steps (~1 min smoke test)
    .venv/bin/python scripts/bench_ig.py --device cuda --images 8 --amp
    .venv/bin/python scripts/bench_ig.py --doll-batch 1 4 16 --size 224 --steps 32 --selected 3   # CPU, ~10 min
    .venv/bin/python scripts/bench_ig.py --device cuda --doll-batch 1 4 16 64 --steps 32 --selected 3 --amp \
        --doll-ibs 512 --doll-rounds 5                                                           # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.processes import MALLOC_ENV as _MALLOC_ENV  # noqa: E402  (the runners' allocator settings)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", "--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--targets", type=int, default=14, help="targets explained per image (identical-work mode)")
    p.add_argument("--selected", type=int, default=2, help="targets per image in DoLL mode (0: skip)")
    p.add_argument("--images", type=int, default=1, help="images timed (each variant runs on every image)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the interleaved sequence over all images this often; s/image is the median over "
                        "rounds of the per-round mean, 'best' the minimum (robust on a shared machine)")
    p.add_argument("--method", default="gausslegendre")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--amp", action="store_true", help="also time the engine with bf16 autocast + channels_last")
    p.add_argument("--engine-ibs", type=int, nargs="*", default=[8],
                   help="extra engine variants with these internal_batch_size values")
    p.add_argument("--quick", action="store_true", help="96 x 96, 8 steps, 1 image: a ~1 minute smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--doll-batch", type=int, nargs="+", default=None, metavar="B",
                   help="batch mode: images/s of the DoLL inferer at these batch sizes (--selected targets per "
                        "image, --steps steps) instead of the captum comparison")
    p.add_argument("--doll-classifiers", type=int, default=2, help="batch mode: classifiers in the ensemble")
    p.add_argument("--doll-ibs", type=int, default=None,
                   help="batch mode: internal_batch_size of IG (interpolated images per forward pass; default "
                        "--steps, i.e. one image's steps per chunk on CPU; on a GPU use e.g. 512)")
    p.add_argument("--doll-rounds", type=int, default=1, help="batch mode: timed batches per batch size (median)")
    p.add_argument("--arch", default="densenet121", choices=("densenet121",),
                   help="network (the DoLL classifiers' architecture at 224 px)")
    p.add_argument("--gpu-tflops", type=float, default=75.0,
                   help="batch mode: effective TFLOP/s assumed for the expected accelerator figure (see "
                        "docs/README.md: H100 bf16 dense peak ~990, DenseNet121 IG reaching ~7.5%% of it)")
    p.add_argument("--no-malloc-tune", action="store_true", help="do not re-exec with the MALLOC_* variables")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.steps, args.images = 96, 8, 1
        args.rounds = max(args.rounds, 2)
    return args


def _maybe_reexec(args: argparse.Namespace) -> bool:
    """Re-execute with the MALLOC_* variables set (once). Returns whether they are set in this process."""
    if all(k in os.environ for k in _MALLOC_ENV):
        return True
    if args.no_malloc_tune or os.environ.get("BENCH_IG_REEXEC") == "1":
        return False
    env = dict(os.environ, BENCH_IG_REEXEC="1")
    for k, v in _MALLOC_ENV.items():
        env.setdefault(k, v)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return True  # pragma: no cover


# ----------------------------------------------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a code region.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: freed heap memory is first
    handed back to the OS (glibc ``malloc_trim(0)``, which matters with the MALLOC tuning that otherwise keeps it),
    the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), and the region's peak is ``VmHWM`` minus the
    RSS at the start: the memory the region itself needed. Falls back to the process peak RSS where unsupported.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.start_kib = 0
        self.can_reset = False
        self._trim: Callable[[int], int] | None = None
        if device == "cpu":
            try:
                import ctypes

                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self._trim = None
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.can_reset = _proc_status_kib("VmHWM") is not None
            except OSError:
                pass

    def reset(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start_kib = torch.cuda.memory_allocated() // 1024
            return
        if self._trim is not None:
            self._trim(0)
        if self.can_reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start_kib = _proc_status_kib("VmRSS") or 0

    def peak_mib(self) -> float:
        """Peak memory above the start of the region, MiB."""
        import torch

        if self.device == "cuda":
            return (torch.cuda.max_memory_allocated() // 1024 - self.start_kib) / 1024
        if self.can_reset:
            return ((_proc_status_kib("VmHWM") or 0) - self.start_kib) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(args: argparse.Namespace) -> tuple[str, Any]:
    """Threads, device check and seeds of a benchmark run: the device and a seeded NumPy generator."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    torch.manual_seed(args.seed)
    return args.device, np.random.default_rng(args.seed)


def matmul_gflops(device: str, n: int = 2048, reps: int = 8) -> tuple[float, float]:
    """Best-of fp32 matmul GFLOP/s for ``n x n`` matrices: by wall time, and by CPU time per thread (less
    sensitive to other processes on a shared machine; equals the wall figure when nothing else runs)."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    (a @ b).sum().item()  # warm-up
    best = best_cpu = float("inf")
    threads = torch.get_num_threads() if device == "cpu" else 1
    for _ in range(reps):
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        (a @ b).sum().item()
        _sync(device)
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, (time.process_time() - c) / threads)
    if device != "cpu":
        best_cpu = best
    return 2 * n**3 / best / 1e9, 2 * n**3 / best_cpu / 1e9


def forward_flops(model: Any, shape: tuple[int, ...], device: str) -> float:
    """Conv + linear FLOPs of one forward pass of one image (``2 x MACs``)."""
    import torch
    from torch import nn

    total = [0.0]

    def conv_hook(mod: nn.Module, inp: Any, out: Any) -> None:
        # 2 x (Cin / groups) x k x Cout x Hout x Wout; out[0] is one sample's (Cout, Hout, Wout)
        k = mod.weight.shape[2:].numel()  # type: ignore[union-attr]
        total[0] += 2.0 * (mod.in_channels // mod.groups) * k * out[0].numel()

    def lin_hook(mod: nn.Module, inp: Any, out: Any) -> None:
        total[0] += 2.0 * mod.in_features * mod.out_features * (out[0].numel() // mod.out_features)

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
    with torch.no_grad():
        model(torch.zeros((1, *shape), device=device))
    for h in hooks:
        h.remove()
    return total[0]


def graph_mib(model: Any, n: int, shape: tuple[int, ...], device: str) -> float:
    """MiB of the tensors autograd saves for backward in one forward pass of ``n`` images requiring grad (the
    memory a chunk of ``n`` interpolated images holds while its targets are backpropagated)."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.zeros((n, *shape), device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values()) / 2**20


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def rel_diff(a: Any, b: Any) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    malloc_tuned = _maybe_reexec(args)

    if args.doll_batch:
        return doll_batch_main(args, malloc_tuned)

    import numpy as np
    import torch
    from captum.attr import IntegratedGradients
    from monai.networks.nets import DenseNet121

    from bundle.explain.ig import MultiTargetIntegratedGradients

    dev, rng = _setup(args)
    k_out = 14
    size, steps, n_t = args.image_size, args.steps, args.targets
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=k_out).to(dev).eval()
    images = torch.rand((args.images, 1, 1, size, size), device=dev)
    all_targets = list(range(n_t))
    selected = [sorted(rng.choice(np.arange(1, k_out), size=args.selected, replace=False).tolist())
                for _ in range(args.images)] if args.selected > 0 else []

    print(f"# bench_ig: DenseNet121 2D 1->{k_out}, {size}x{size}, {n_t} targets x {steps} {args.method} steps, "
          f"{args.images} image(s), device={dev}, threads={torch.get_num_threads()}, torch {torch.__version__}",
          flush=True)
    print("# MALLOC tuning: " + (", ".join(f"{k}={os.environ[k]}" for k in _MALLOC_ENV) if malloc_tuned
                                 else "off (glibc defaults)"), flush=True)

    gflops_start, gflops_start_cpu = matmul_gflops(dev)
    f_fwd = forward_flops(model, (1, size, size), dev)
    print(f"# fp32 matmul (2048^3): {gflops_start:.1f} GFLOP/s (by CPU time per thread: {gflops_start_cpu:.1f}); "
          f"forward conv+linear: {f_fwd / 1e9:.3f} GFLOP/image",
          flush=True)

    graph = {b: graph_mib(model, b, (1, size, size), dev) for b in sorted({steps, *args.engine_ibs})}
    print("# autograd graph per forward chunk: " + ", ".join(f"{b} images {m:.0f} MiB" for b, m in graph.items()),
          flush=True)

    ig = IntegratedGradients(model)
    engine = MultiTargetIntegratedGradients(model)
    engine_amp = MultiTargetIntegratedGradients(model, amp_dtype=torch.bfloat16, channels_last=True) \
        if args.amp else None
    mem = PeakMemory(dev)

    def captum_run(x: Any, targets: list[int]) -> Any:
        maps, deltas = [], []
        for c in targets:
            a, d = ig.attribute(x, baselines=torch.zeros_like(x), target=c, n_steps=steps, method=args.method,
                                internal_batch_size=steps, return_convergence_delta=True)
            maps.append(a)
            deltas.append(d)
        return torch.stack(maps, 1), torch.stack(deltas, 1)

    def engine_run(eng: Any, ibs: int) -> Callable[[Any, list[int]], Any]:
        def run(x: Any, targets: list[int]) -> Any:
            r = eng.attribute(x, [targets], baselines="zeros", n_steps=steps, method=args.method,
                              internal_batch_size=ibs, return_convergence_delta=True)
            return r.attributions, r.delta
        return run

    # warm-up (oneDNN primitive caches, allocator) on a small problem
    warm = images[0]
    captum_run(warm, [0])
    engine_run(engine, steps)(warm, [0, 1])
    if engine_amp is not None:
        engine_run(engine_amp, steps)(warm, [0, 1])

    variants: list[tuple[str, str, Callable[[Any, list[int]], Any]]] = [
        ("captum", "all", captum_run),
        ("engine", "all", engine_run(engine, steps)),
    ]
    variants += [(f"engine/ibs={b}", "all", engine_run(engine, b)) for b in args.engine_ibs if b != steps]
    if engine_amp is not None:
        variants.append(("engine/bf16+channels_last", "all", engine_run(engine_amp, steps)))
    if selected:
        variants += [("captum/selected", "sel", captum_run), ("engine/selected", "sel", engine_run(engine, steps))]

    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    diffs: dict[str, float] = {}
    delta_max: dict[str, float] = {}
    for rnd, i in ((r, i) for r in range(args.rounds) for i in range(args.images)):
        x = images[i]
        # alternate the order between images and rounds
        order = variants if (rnd * args.images + i) % 2 == 0 else variants[::-1]
        results: dict[str, Any] = {}
        for name, kind, fn in order:
            targets = all_targets if kind == "all" else selected[i]
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            attr, delta = fn(x, targets)
            _sync(dev)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            times[name].append(dt)
            cpu_times[name].append(dc)
            results[name] = (attr.detach().cpu(), delta.detach().cpu())
            print(f"  round {rnd} image {i}: {name:<28s} {dt:8.2f} s wall {dc:8.2f} s CPU  ({len(targets)} targets, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
        ref = {"all": results["captum"], "sel": results.get("captum/selected")}
        for name, kind, _ in variants:
            if name.startswith("captum"):
                continue
            a, d = results[name]
            ra, rd = ref[kind]
            diffs[name] = max(diffs.get(name, 0.0), rel_diff(a, ra))
            delta_max[name] = max(delta_max.get(name, 0.0), float((d - rd).abs().max()))
        delta_max["captum"] = max(delta_max.get("captum", 0.0), float(results["captum"][1].abs().max()))

    # memory pass (not timed): the peak of IG is one chunk's graph plus its backward passes, independent of the
    # number of targets, so each variant runs once on 2 of its targets after freed memory went back to the OS
    peaks: dict[str, float] = {}
    for name, kind, fn in variants:
        targets = (all_targets if kind == "all" else selected[0])[:2]
        mem.reset()
        fn(images[0], targets)
        peaks[name] = mem.peak_mib()
    print("# peak memory above the start of each variant (" + ("RSS" if dev == "cpu" else "CUDA allocated")
          + "): " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()), flush=True)

    gflops_end, gflops_end_cpu = matmul_gflops(dev)
    gflops = max(gflops_start, gflops_end)
    gflops_cpu = max(gflops_start_cpu, gflops_end_cpu)
    n_threads = torch.get_num_threads() if dev == "cpu" else 1
    def per_round(v: list[float]) -> Any:
        return np.asarray(v).reshape(args.rounds, args.images).mean(1)

    sec = {k: float(np.median(per_round(v))) for k, v in times.items()}
    best = {k: float(np.min(per_round(v))) for k, v in times.items()}
    cpu = {k: float(np.median(per_round(v))) for k, v in cpu_times.items()}

    def flops(name: str) -> float:
        t = args.selected if name.endswith("selected") else n_t
        return (2 * t * steps if name.startswith("captum") else steps * (1 + t)) * f_fwd

    rows = []
    print(f"\n# fp32 matmul: {gflops_start:.1f} GFLOP/s at start, {gflops_end:.1f} at end (fraction uses the max, "
          f"{gflops:.1f}); by CPU time per thread {gflops_start_cpu:.1f} / {gflops_end_cpu:.1f} (max {gflops_cpu:.1f})"
          f"; 'of matmul' = GFLOP/s over matmul GFLOP/s, wall and CPU-time based")
    print(f"{'variant':<28s} {'s/image':>9s} {'vs captum':>10s} {'best s':>8s} {'vs captum':>10s} "
          f"{'CPU s/img':>10s} {'vs captum':>10s} "
          f"{'TFLOP/img':>10s} {'GFLOP/s':>8s} {'of matmul':>9s} {'(CPU)':>6s} {'peak MiB':>9s} {'rel diff':>9s}")
    for name, _, _ in variants:
        s = sec[name]
        fl = flops(name)
        row = {"variant": name, "s_per_image": s, "speedup_vs_captum_all": sec["captum"] / s,
               "best_s_per_image": best[name], "best_speedup_vs_captum_all": best["captum"] / best[name],
               "cpu_s_per_image": cpu[name], "cpu_speedup_vs_captum_all": cpu["captum"] / cpu[name],
               "flop_per_image": fl, "gflops": fl / s / 1e9, "fraction_of_matmul": fl / s / 1e9 / gflops,
               "fraction_of_matmul_cpu_time": fl / (cpu[name] / n_threads) / 1e9 / gflops_cpu,
               "peak_mib": peaks[name], "max_rel_diff_vs_captum": diffs.get(name),
               "max_abs_delta_diff_vs_captum": delta_max.get(name)}
        rows.append(row)
        print(f"{name:<28s} {s:9.2f} {row['speedup_vs_captum_all']:9.2f}x {best[name]:8.2f} "
              f"{row['best_speedup_vs_captum_all']:9.2f}x {cpu[name]:10.2f} "
              f"{row['cpu_speedup_vs_captum_all']:9.2f}x {fl / 1e12:10.3f} {row['gflops']:8.1f} "
              f"{row['fraction_of_matmul']:9.1%} {row['fraction_of_matmul_cpu_time']:6.1%} {peaks[name]:9.0f} "
              f"{'-' if diffs.get(name) is None else format(diffs[name], '.1e'):>9s}")
    summary = {
        "identical_work_speedup": sec["captum"] / sec["engine"],
        "identical_work_speedup_cpu_time": cpu["captum"] / cpu["engine"],
        "identical_work_speedup_best": best["captum"] / best["engine"],
        "flop_floor_speedup": flops("captum") / flops("engine"),
        "max_abs_captum_delta": delta_max["captum"],
    }
    print(f"\nidentical work ({n_t} targets x {steps} steps): engine {sec['engine']:.2f} s/image vs captum "
          f"{sec['captum']:.2f} s/image -> {summary['identical_work_speedup']:.2f}x "
          f"(best of rounds: {summary['identical_work_speedup_best']:.2f}x; CPU time: "
          f"{summary['identical_work_speedup_cpu_time']:.2f}x; FLOP floor ratio "
          f"{summary['flop_floor_speedup']:.2f}x)")
    if selected:
        summary["doll_vs_captum_all"] = sec["captum"] / sec["engine/selected"]
        summary["doll_vs_captum_selected"] = sec["captum/selected"] / sec["engine/selected"]
        summary["doll_vs_captum_all_best"] = best["captum"] / best["engine/selected"]
        summary["doll_vs_captum_selected_best"] = best["captum/selected"] / best["engine/selected"]
        summary["doll_vs_captum_all_cpu_time"] = cpu["captum"] / cpu["engine/selected"]
        summary["doll_vs_captum_selected_cpu_time"] = cpu["captum/selected"] / cpu["engine/selected"]
        print(f"DoLL mode ({args.selected} selected targets): engine {sec['engine/selected']:.2f} s/image -> "
              f"{summary['doll_vs_captum_all']:.2f}x vs captum over all {n_t} targets, "
              f"{summary['doll_vs_captum_selected']:.2f}x vs captum over the same {args.selected} targets "
              f"(best of rounds: {summary['doll_vs_captum_all_best']:.2f}x, "
              f"{summary['doll_vs_captum_selected_best']:.2f}x; "
              f"CPU time: {summary['doll_vs_captum_all_cpu_time']:.2f}x, "
              f"{summary['doll_vs_captum_selected_cpu_time']:.2f}x)")
    print(f"load average now: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)")
    print(f"max |delta| (captum, fp32): {delta_max['captum']:.3e}; peak RSS of the process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "malloc_tuned": malloc_tuned, "matmul_gflops": [gflops_start, gflops_end],
              "matmul_gflops_cpu_time": [gflops_start_cpu, gflops_end_cpu],
              "forward_gflop_per_image": f_fwd / 1e9,
              "graph_mib_per_chunk": graph, "variants": rows, "summary": summary}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result

# ----------------------------------------------------------------------------------------------------------------
def doll_batch_main(args: argparse.Namespace, malloc_tuned: bool) -> dict[str, Any]:
    """Batch mode: images/s of :class:`bundle.doll.inferer.DoLLInferer` at each ``--doll-batch`` size."""
    import numpy as np
    import torch
    from monai.networks.nets import DenseNet121

    from bundle.doll.generator import ClassifierEnsemble, DoLLGenerator
    from bundle.doll.inferer import DoLLInferer

    dev, rng = _setup(args)
    k_out, size, steps, n_sel = 14, args.image_size, args.steps, max(1, args.selected)
    ibs = args.doll_ibs or steps
    nets = [DenseNet121(spatial_dims=2, in_channels=1, out_channels=k_out).to(dev).eval()
            for _ in range(args.doll_classifiers)]
    # the post-processing of configs/generate_doll.yaml; targets = the labelled ones (exactly --selected per image)
    gen = DoLLGenerator(nets, targets={"source": "labels"},
                        ig={"n_steps": steps, "method": args.method, "internal_batch_size": ibs,
                            "amp_dtype": torch.bfloat16 if args.amp else None},
                        post={"smooth_sigma": 4.0, "normalize": "percentile", "threshold": "percentile",
                              "threshold_value": 95.0, "min_component_size": 16})
    inferer, network = DoLLInferer(gen, soft=False), ClassifierEnsemble(nets)

    def batch(b: int) -> tuple[Any, Any]:
        x = torch.rand((b, 1, size, size), device=dev)
        labels = torch.zeros((b, k_out), device=dev)
        for i in range(b):
            labels[i, rng.choice(np.arange(1, k_out), size=n_sel, replace=False)] = 1.0
        return x, labels

    print(f"# bench_ig --doll-batch: DoLL inferer, {args.doll_classifiers} x DenseNet121 2D 1->{k_out}, "
          f"{size}x{size}, {n_sel} targets x {steps} {args.method} steps per image and classifier, "
          f"internal_batch_size {ibs}, device={dev}{' bf16' if args.amp else ''}, threads={torch.get_num_threads()}, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    print("# MALLOC tuning: " + ("on" if malloc_tuned else "off (glibc defaults)"), flush=True)
    gflops_start, _ = matmul_gflops(dev)
    f_fwd = forward_flops(nets[0], (1, size, size), dev)
    # per image: the ensemble's forward, IG (steps x (forward + one input-gradient backward per target) per
    # classifier) and the completeness check (2 forwards per classifier: input and baseline)
    flop_image = args.doll_classifiers * (1 + steps * (1 + n_sel) + 2) * f_fwd
    print(f"# fp32 matmul (2048^3): {gflops_start:.1f} GFLOP/s; forward conv+linear {f_fwd / 1e9:.3f} GFLOP/image; "
          f"DoLL {flop_image / 1e12:.3f} TFLOP/image (input-gradient backward = 1 forward)", flush=True)

    # warm-up (oneDNN / cuDNN primitives for the chunk shape, allocator): one image, one target, all its steps
    xw, lw = batch(1)
    lw[0] = 0.0
    lw[0, 1] = 1.0
    inferer(xw, network, labels=lw)
    rows = []
    for b in args.doll_batch:
        walls, cpus = [], []
        for _ in range(args.doll_rounds):
            x, labels = batch(b)
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            pred = inferer(x, network, labels=labels)
            _sync(dev)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            assert int(pred["targets"].sum()) == b * n_sel
        wall, cpu = float(np.median(walls)), float(np.median(cpus))
        row = {"batch": b, "s_per_batch": wall, "images_per_s": b / wall, "cpu_s_per_batch": cpu,
               "gflops": b * flop_image / wall / 1e9, "fraction_of_matmul": b * flop_image / wall / 1e9 / gflops_start,
               "load": os.getloadavg()[0]}
        rows.append(row)
        print(f"  batch {b:3d}: {wall:8.2f} s/batch  {row['images_per_s']:8.3f} images/s  {cpu:8.2f} s CPU  "
              f"{row['gflops']:7.1f} GFLOP/s ({row['fraction_of_matmul']:.0%} of matmul)  load {row['load']:.1f}",
              flush=True)
    expected = args.gpu_tflops * 1e12 / flop_image
    print(f"\nexpected on an accelerator sustaining {args.gpu_tflops:.0f} effective TFLOP/s: "
          f"{expected:.0f} DoLL images/s ({flop_image / 1e9:.0f} GFLOP/image)")
    result = {"mode": "doll_batch", "device": dev, "arch": args.arch, "image_size": size, "steps": steps,
              "targets_per_image": n_sel, "classifiers": args.doll_classifiers, "internal_batch_size": ibs,
              "amp_bf16": bool(args.amp), "threads": torch.get_num_threads(), "matmul_gflops": gflops_start,
              "forward_gflop_per_image": f_fwd / 1e9, "doll_gflop_per_image": flop_image / 1e9, "batches": rows,
              "assumed_gpu_tflops": args.gpu_tflops, "expected_gpu_images_per_s": expected}
    print("DOLL_BATCH_JSON " + json.dumps(result), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
