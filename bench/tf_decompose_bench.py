"""Time and peak memory of TensorFlow ``auto_decomposition`` on a checkpoint, per seed shape.

For every shape, a fresh process writes a checkpoint holding one Conv2D of that shape (NHWC,
kernel (KH, KW, Cin, Cout)); then, in another fresh process so that peak RSS is its own,
``amct_tensorflow.tensor_decompose.auto_decomposition(meta, ckpt, save)`` runs end to end
(import the graph, read the kernel, solve, rewrite, restore, save the decomposed checkpoint
and the change file). Inside that process the core solver's calls are timed too, so
``io+graph`` (the total less that solver time, in the same run) is what the checkpoint I/O and
graph work add (goal: less than the solver itself). A third process times the core solver
alone on the same kernel, in TensorFlow's layout as the plugin passes it (``alone s``:
the two solver figures differ only by the machine's noise between runs).
Figures are printed beside the reference TF figures (AMCT on a Xeon E5-2699 v4, 512 GB):
25, 16, 78, 63 and 430 s, about 32 GB for (2048, 2048, 5, 5).

Kernels are the synthetic ones of decompose_bench.py (seeded, float32): no pretrained model
of these shapes ships with a pip package, and the cost depends on the shape, not the values.

    python bench/tf_decompose_bench.py [--shapes 512,512,5,5 ...] [--repeat N]

``--repeat N`` runs ``auto_decomposition`` and the solver alone N times per shape (each in a
fresh process, on the same checkpoint) and prints the medians, with the fastest and slowest
total in ``spread s``; peak MB is the largest of the runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decompose_bench import SEED_SHAPES, make_kernel, median_and_spread

TF_REFERENCE_SECONDS = {(512, 512, 5, 5): 25.0, (1024, 1024, 3, 3): 16.0,
                        (1024, 1024, 5, 5): 78.0, (2048, 2048, 3, 3): 63.0,
                        (2048, 2048, 5, 5): 430.0}
TF_REFERENCE_NOTE = ("reference: AMCT TF on a Xeon E5-2699 v4 with 512 GB; (2048,2048,5,5) "
                     "used about 32 GB")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _quiet_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    return tf


def child_write(shape: tuple[int, ...], folder: str) -> None:
    tf = _quiet_tf()
    tf1 = tf.compat.v1
    cout, cin = shape[:2]
    kernel = make_kernel(shape).transpose(2, 3, 1, 0)
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 16, 16, cin], name="x")
        with tf1.variable_scope("conv2d"):
            # The placeholder initial value keeps the 400 MB kernel out of the GraphDef.
            value = tf1.placeholder(tf.float32, kernel.shape)
            weight = tf1.Variable(value, name="kernel")
            bias = tf1.get_variable("bias", [cout], initializer=tf1.zeros_initializer())
        y = tf.nn.bias_add(tf.nn.conv2d(x, weight, 1, "SAME", name="conv2d/Conv2D"), bias)
        tf.identity(y, name="out")
        saver = tf1.train.Saver()
        with tf1.Session() as session:
            session.run(tf1.global_variables_initializer(), {value: kernel})
            saver.save(session, os.path.join(folder, "base", "model"))
    # A user's checkpoint was written long before it is decomposed: flush it to disk now, so
    # that the kernel's writeback does not run during the timed decomposition.
    os.sync()


def child_decompose(shape: tuple[int, ...], folder: str, out: str) -> None:
    _quiet_tf()
    from amct_tensorflow.tensor_decompose import auto_decomposition
    from amct_tensorflow.tensor_decompose import tensor_decompose as plugin

    solver_seconds = []
    factorize = plugin.factorize_kernel

    def timed_factorize(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return factorize(*args, **kwargs)
        finally:
            solver_seconds.append(time.perf_counter() - begin)

    plugin.factorize_kernel = timed_factorize
    base = os.path.join(folder, "base", "model")
    start = time.perf_counter()
    new_ops = auto_decomposition(base + ".meta", base, os.path.join(folder, "dec", "model"))
    seconds = time.perf_counter() - start
    with open(out, "w") as stream:
        json.dump({"seconds": seconds, "solver_seconds": sum(solver_seconds),
                   "peak_mb": _peak_rss_mb(), "new_ops": new_ops}, stream)


def child_solver(shape: tuple[int, ...], out: str) -> None:
    from amct_core.decompose import decompose_conv_weight

    # The kernel as the plugin hands it over: TensorFlow's (KH, KW, Cin, Cout) array seen as
    # (Cout, Cin, KH, KW), which the solver reads as it lies.
    weight = np.transpose(np.ascontiguousarray(make_kernel(shape).transpose(2, 3, 1, 0)),
                          (3, 2, 0, 1))
    start = time.perf_counter()
    factors = decompose_conv_weight(weight)
    seconds = time.perf_counter() - start
    with open(out, "w") as stream:
        json.dump({"seconds": seconds, "peak_mb": _peak_rss_mb(), "rank": factors.rank},
                  stream)


def _child(kind: str, shape: tuple[int, ...], folder: str) -> dict:
    handle, out = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        subprocess.run([sys.executable, __file__, "--child", kind, "--folder", folder,
                        "--out", out, "--shapes", ",".join(str(v) for v in shape)],
                       check=True, timeout=7200)
        with open(out) as stream:
            text = stream.read()
        return json.loads(text) if text else {}
    finally:
        os.unlink(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="kernel shapes as Cout,Cin,KH,KW (default: the five seed shapes)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per shape (the medians are printed)")
    parser.add_argument("--child", choices=["write", "decompose", "solver"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    # nox -s bench passes the same arguments to both benchmarks: ignore the solver bench's.
    args, _ = parser.parse_known_args()
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes
              else SEED_SHAPES)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.child == "write":
        child_write(shapes[0], args.folder)
        return
    if args.child == "decompose":
        child_decompose(shapes[0], args.folder, args.out)
        return
    if args.child == "solver":
        child_solver(shapes[0], args.out)
        return
    print(f"[bench] {os.cpu_count()} CPU cores; TensorFlow auto_decomposition on a checkpoint "
          f"holding one conv; synthetic float32 kernels; {TF_REFERENCE_NOTE}", flush=True)
    print(f"{'shape':>20} {'total s':>8} {'spread s':>11} {'solver s':>8} {'io+graph':>8} "
          f"{'alone s':>8} {'peak MB':>8} {'ref s':>6} {'goal s':>6} {'vs ref':>7}", flush=True)
    for shape in shapes:
        folder = tempfile.mkdtemp(prefix="amct-tf-bench-")
        try:
            _child("write", shape, folder)
            runs = [_child("decompose", shape, folder) for _ in range(args.repeat)]
            alone = [_child("solver", shape, folder)["seconds"] for _ in range(args.repeat)]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        total, spread = median_and_spread([run["seconds"] for run in runs])
        solver = float(np.median([run["solver_seconds"] for run in runs]))
        extra = float(np.median([run["seconds"] - run["solver_seconds"] for run in runs]))
        peak = max(run["peak_mb"] for run in runs)
        reference = TF_REFERENCE_SECONDS.get(shape)
        vs_ref = "" if reference is None else f"{reference / total:.1f}x"
        goal = "" if reference is None else f"{reference / 10:.1f}"
        print(f"{shape!s:>20} {total:>8.2f} {spread:>11} {solver:>8.2f} {extra:>8.2f} "
              f"{float(np.median(alone)):>8.2f} {peak:>8.0f} {reference or '':>6} {goal:>6} "
              f"{vs_ref:>7}", flush=True)
    if args.repeat > 1:
        print(f"[bench] medians of {args.repeat} runs per shape; spread s: fastest-slowest "
              f"total", flush=True)


if __name__ == "__main__":
    main()
