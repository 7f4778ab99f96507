"""Time and peak memory of decomposing one conv of each seed shape.

For every shape the script runs, each in a fresh process so peak RSS is its own:
  * amct_core's solver (decompose_conv_weight: unfolding, EVBMF rank rule, top-r factors);
  * a plain ``numpy.linalg.svd`` of the same unfolding (what the reference implementation
    calls), measured in the same run;
and prints them next to the reference figures (AMCT on a 22-core Xeon E5-2699 v4) and the
goal of this project (10x faster than the reference on this machine, 2 GB peak for the
largest kernel), with the factor error relative to the optimal (Eckart-Young) error for the
chosen rank, taken from numpy's singular values.

Kernels are synthetic (seeded Gaussian with a decaying per-input-channel scale, float32):
no pretrained model of these shapes ships with a pip package, and the cost depends on the
shape, not on the values.

    python bench/decompose_bench.py [--shapes 512,512,5,5 1024,1024,3,3 ...] [--no-numpy]
                                    [--repeat N]

``--repeat N`` runs amct_core's solver N times per shape (each in a fresh process) and prints
the median time, with the fastest and slowest run in ``spread s``: on a shared or virtual
machine one run can be several percent off.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SEED_SHAPES = [(512, 512, 5, 5), (1024, 1024, 3, 3), (1024, 1024, 5, 5), (2048, 2048, 3, 3),
               (2048, 2048, 5, 5)]
REFERENCE_SECONDS = {(512, 512, 5, 5): 7.0, (1024, 1024, 3, 3): 12.0, (1024, 1024, 5, 5): 52.0,
                     (2048, 2048, 3, 3): 89.0, (2048, 2048, 5, 5): 374.0}
REFERENCE_NOTE = "reference: AMCT on a 22-core Xeon E5-2699 v4; (2048,2048,5,5) used about 9 GB"


def make_kernel(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape, dtype=np.float32)
    weight *= np.linspace(2.0, 0.05, shape[1], dtype=np.float32).reshape(1, -1, 1, 1)
    return weight


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _composed_error(weight: np.ndarray, first: np.ndarray, last: np.ndarray) -> float:
    """‖W − compose(first, last)‖²_F, accumulated over blocks of output channels."""
    total = 0.0
    step = 128
    for start in range(0, weight.shape[0], step):
        block = last[start:start + step].astype(np.float64)
        if first.shape[3] == 1:  # first (r, Cin, KH, 1), last (Cout, r, 1, KW)
            part = np.tensordot(block[:, :, 0, :], first[:, :, :, 0].astype(np.float64),
                                axes=([1], [0])).transpose(0, 2, 3, 1)
        else:  # first (r, Cin, 1, KW), last (Cout, r, KH, 1)
            part = np.tensordot(block[:, :, :, 0], first[:, :, 0, :].astype(np.float64),
                                axes=([1], [0])).transpose(0, 2, 1, 3)
        total += float(np.sum((weight[start:start + step].astype(np.float64) - part) ** 2))
    return total


def child_amct(shape: tuple[int, ...], out: str) -> None:
    from amct_core.decompose import decompose_conv_weight

    weight = make_kernel(shape)
    start = time.perf_counter()
    factors = decompose_conv_weight(weight)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    error = _composed_error(weight, factors.first, factors.last)
    with open(out, "w") as stream:
        json.dump({"seconds": seconds, "peak_mb": peak, "rank": factors.rank,
                   "evbmf_rank": factors.evbmf_rank, "mode": factors.mode.name,
                   "error": error}, stream)


def child_numpy(shape: tuple[int, ...], out: str) -> None:
    from amct_core.decompose import select_mode, unfold_weight

    weight = make_kernel(shape)
    mode = select_mode(shape[0], shape[1], shape[2:])
    unfolding = np.ascontiguousarray(unfold_weight(weight, mode))
    start = time.perf_counter()
    _, singular, _ = np.linalg.svd(unfolding, full_matrices=False)
    seconds = time.perf_counter() - start
    np.save(out + ".npy", singular.astype(np.float64))
    with open(out, "w") as stream:
        json.dump({"seconds": seconds, "peak_mb": _peak_rss_mb()}, stream)


def run_child(kind: str, shape: tuple[int, ...], timeout: float) -> dict | None:
    handle, out = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    command = [sys.executable, __file__, "--child", kind, "--shapes",
               ",".join(str(v) for v in shape)]
    try:
        subprocess.run([*command, "--out", out], check=True, timeout=timeout)
        with open(out) as stream:
            result = json.load(stream)
        if os.path.exists(out + ".npy"):
            result["singular"] = np.load(out + ".npy")
        return result
    except subprocess.TimeoutExpired:
        return None
    finally:
        for path in (out, out + ".npy"):
            if os.path.exists(path):
                os.unlink(path)


def median_and_spread(values: list[float]) -> tuple[float, str]:
    """(median of ``values``, "min-max" of them, or "" for one value)."""
    median = float(np.median(values))
    spread = f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else ""
    return median, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="kernel shapes as Cout,Cin,KH,KW (default: the five seed shapes)")
    parser.add_argument("--no-numpy", action="store_true",
                        help="skip the numpy.linalg.svd baseline (no optimal-error check)")
    parser.add_argument("--numpy-timeout", type=float, default=1800.0,
                        help="seconds after which the numpy baseline of one shape is abandoned")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of amct_core's solver per shape (the median is printed)")
    parser.add_argument("--child", choices=["amct", "numpy"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes
              else SEED_SHAPES)
    if args.child:
        (child_amct if args.child == "amct" else child_numpy)(shapes[0], args.out)
        return
    print(f"[bench] {os.cpu_count()} CPU cores; synthetic float32 kernels (seeded Gaussian, "
          f"decaying input-channel scale); {REFERENCE_NOTE}", flush=True)
    header = (f"{'shape':>20} {'mode':>5} {'rank':>5} {'amct s':>8} {'spread s':>11} "
              f"{'amct MB':>8} "
              f"{'numpy s':>8} {'numpy MB':>8} {'ref s':>6} {'goal s':>6} {'vs ref':>7} "
              f"{'vs numpy':>8} {'err/opt':>8}")
    print(header)
    for shape in shapes:
        runs = [run_child("amct", shape, timeout=3600) for _ in range(args.repeat)]
        ours = dict(runs[0])
        ours["seconds"], spread = median_and_spread([run["seconds"] for run in runs])
        ours["peak_mb"] = max(run["peak_mb"] for run in runs)
        base = None if args.no_numpy else run_child("numpy", shape, args.numpy_timeout)
        reference = REFERENCE_SECONDS.get(shape)
        ratio = "" if base is None else f"{base['seconds'] / ours['seconds']:.1f}x"
        vs_ref = "" if reference is None else f"{reference / ours['seconds']:.1f}x"
        goal = "" if reference is None else f"{reference / 10:.1f}"
        err = ""
        if base is not None:
            optimal = float(np.sum(base["singular"][ours["rank"]:] ** 2))
            err = f"{ours['error'] / optimal:.5f}"
        numpy_s = "timeout" if base is None and not args.no_numpy else (
            "" if base is None else f"{base['seconds']:.2f}")
        numpy_mb = "" if base is None else f"{base['peak_mb']:.0f}"
        print(f"{shape!s:>20} {ours['mode']:>5} {ours['rank']:>5} {ours['seconds']:>8.2f} "
              f"{spread:>11} {ours['peak_mb']:>8.0f} {numpy_s:>8} {numpy_mb:>8} "
              f"{'' if reference is None else reference:>6} {goal:>6} {vs_ref:>7} {ratio:>8} "
              f"{err:>8}", flush=True)
    print(f"[bench] amct s: median of {args.repeat} run(s); "
          "amct MB / numpy MB: peak RSS of the whole process (kernel included); "
          "err/opt: factor error over the optimal rank-r error (1.0 = optimal)")


if __name__ == "__main__":
    main()
