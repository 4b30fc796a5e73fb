"""Time of the factored inverses, (F + shift·I)⁻¹, by blocks against the Cholesky solve, side by side.

    python benchmarks/inversion_time.py [--models cnn,resnet50] [--repeats 5] [--json out.json]

For each model, the dense factor sides of `KFAC()`'s blocks (AlexNet-style CNN of
`keras_kfac.models.alexnet`; `keras.applications.ResNet50(weights=None)` at 32x32, whose
factor sides do not depend on the input size); for each distinct side, a damped Gram matrix of
that side is inverted in float32 by (a) the former path, a Cholesky factor solved against the
identity (`tf.linalg.cholesky_solve`), and (b) `keras_kfac.factors.spd_inverse` (the Cholesky
factor inverted by 2x2 blocks, then L⁻ᵀ L⁻¹), each as a `tf.function`, alternating, medians of
`--repeats` calls after one warm-up call.  The model's total is the sum over its factors (a side
counted once per factor that has it): the cost of one inversion call of the whole model, the
cost `benchmarks/step_time.py` divides by `inverse_every`.  Both results are also compared with
each other (relative difference of the inverses).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac.factors import DenseFactor, spd_inverse  # noqa: E402
from keras_kfac.models import alexnet  # noqa: E402


def model_sides(name: str) -> collections.Counter:
    """Side → number of dense factors with that side, for `KFAC()` on the model."""
    if name == "cnn":
        model, shape = alexnet(), (28, 28, 1)
    elif name == "resnet50":
        model = keras_kfac.wrap(keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10))
        shape = (32, 32, 3)
    else:
        raise SystemExit(f"unknown model {name!r}: cnn or resnet50")
    optimizer = keras_kfac.KFAC()
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(size=(8, *shape)).astype("float32")
    model.train_on_batch(x, np.zeros(8, "int32"))
    sides = collections.Counter()
    for block in optimizer.blocks:
        for side in getattr(getattr(block, "inversion", None), "sides", ()):
            if isinstance(side, DenseFactor):
                sides[side.size] += 1
    return sides


def cholesky_solve_inverse(matrix: tf.Tensor) -> tf.Tensor:
    """The former path: `spd_inverse` with no split, the Cholesky factor solved against the identity."""
    return spd_inverse(matrix, solve_size=matrix.shape[0])


def time_side(size: int, repeats: int) -> dict:
    rng = np.random.default_rng(size)
    rows = rng.normal(size=(max(size // 2, 1), size)).astype("float32")
    matrix = tf.constant(rows.T @ rows / rows.shape[0] + 1e-2 * np.eye(size, dtype="float32"))
    paths = {"cholesky_solve": tf.function(cholesky_solve_inverse), "by_blocks": tf.function(spd_inverse)}
    results = {name: f(matrix).numpy() for name, f in paths.items()}  # warm-up (tracing)
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, f in paths.items():
            start = time.perf_counter()
            f(matrix).numpy()
            times[name].append(time.perf_counter() - start)
    a, b = (results[n].astype(np.float64) for n in paths)
    return {
        "size": size,
        **{f"{name}_ms": 1000 * float(np.median(t)) for name, t in times.items()},
        "relative_difference": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="cnn,resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": {}}
    print(f"# {' '.join(sys.argv)} — {report['date']}, TF {tf.__version__}, {os.cpu_count()} CPU(s)")
    for name in args.models.split(","):
        sides = model_sides(name)
        rows = [time_side(size, args.repeats) | {"count": count} for size, count in sorted(sides.items())]
        total = {k: sum(r[k] * r["count"] for r in rows) for k in ("cholesky_solve_ms", "by_blocks_ms")}
        report["models"][name] = {"sides": rows, "total": total}
        print(f"\n## {name}: {sum(sides.values())} dense factors\n")
        print("| side | factors | Cholesky solve ms | by blocks ms | ratio | relative difference |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            ratio = r["cholesky_solve_ms"] / r["by_blocks_ms"]
            print(
                f"| {r['size']} | {r['count']} | {r['cholesky_solve_ms']:.1f} | {r['by_blocks_ms']:.1f} "
                f"| {ratio:.2f} | {r['relative_difference']:.1e} |"
            )
        ratio = total["cholesky_solve_ms"] / total["by_blocks_ms"]
        print(
            f"| **all factors, one call** | {sum(sides.values())} | {total['cholesky_solve_ms']:.0f} "
            f"| {total['by_blocks_ms']:.0f} | {ratio:.2f} | |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
