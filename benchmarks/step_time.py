"""Training-step time of SGD, Adam and K-FAC, measured side by side in one process.

    python benchmarks/step_time.py [--rounds 5] [--steps 40] [--json out.json] [--only NAME,...]
                                   [--models mlp,cnn,vit,mobilenet_v2] [--no-breakdown] [--warmup-steps N]
    python benchmarks/step_time.py --inversions-only [--models ...] [--rounds 5]

Models: (a) MLP 784-256-256-10 at batch 256, (b) the AlexNet-style CNN of
`keras_kfac.models.alexnet` at batch 128, (c) the small ViT of `keras_kfac.models.vit` at batch
128, (d) `keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)` at
batch 128 (wrapped with `keras_kfac.wrap`).  The MLP and the CNN are compared to Adam, the ViT and
MobileNetV2 to AdamW (the "x" column and the breakdown's reference step; Adam is timed too).
Data are random tensors already in memory.  Every
optimizer trains its own copy of the model (same initial weights); after warm-up (compilation
and a first inversion) the configurations are timed in interleaved rounds, step by step, so
that machine noise hits all of them alike.  The mean step time amortizes the periodic
statistics and inversions; the median and the interquartile range describe a typical step.

The K-FAC breakdown is measured by difference: "statistics" is (K-FAC with statistics every
step, no inversions) − (K-FAC with neither); "inversion" is the time of one call of the
inversions (Cholesky inverses, the default) as the train step runs them (compiled, in a graph), and
that divided by `inverse_every` (`--inversions-only` times that call alone, and called eagerly
beside it, as this script timed it before 2026-12-05: op by op, several times slower);
"preconditioning" is (K-FAC with neither) − the reference (Adam or AdamW), i.e. the preconditioned
update and its bookkeeping.  The floor is the arithmetic of
preconditioning (two products per side per Kronecker block, per channel for depthwise blocks; the per-feature
2x2 blocks of the normalization layers are not counted) over the arithmetic of a forward and backward pass
(Dense, EinsumDense, Conv2D and DepthwiseConv2D kernels and the attention products), plus one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac.models import alexnet, mlp, vit  # noqa: E402

NEVER = 10**9  # a period no benchmark reaches

# name -> (batch size, input shape of one example, reference optimizer of the "x" column)
MODELS = {
    "mlp": (256, (28, 28, 1), "adam"),
    "cnn": (128, (28, 28, 1), "adam"),
    "vit": (128, (28, 28, 1), "adamw"),
    "mobilenet_v2": (128, (32, 32, 3), "adamw"),
}
REFERENCE_LABELS = {"adam": "Adam", "adamw": "AdamW"}


def forward_backward_flops(model, batch: int) -> float:
    """2·(multiply-adds) for the forward pass of every Dense/Conv2D/DepthwiseConv2D kernel (at
    every output position) and of MultiHeadAttention (its four projections and the two products
    QKᵀ and (softmax)V, self-attention assumed), times 3 (the backward pass computes two
    products of the same size)."""
    total = 0.0
    for layer in model.layers:
        positions = 0
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            positions = int(np.prod(layer.output.shape[1:-1]))
            total += 2.0 * batch * positions * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.MultiHeadAttention):
            tokens = int(np.prod(layer.output.shape[1:-1]))
            projections = (layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense)
            total += 2.0 * batch * tokens * sum(int(np.prod(d.kernel.shape)) for d in projections)
            heads, key_dim = int(layer.query_dense.kernel.shape[-2]), int(layer.query_dense.kernel.shape[-1])
            total += 2.0 * 2.0 * batch * heads * tokens * tokens * key_dim
    return 3.0 * total


def block_preconditioning_flops(block) -> float:
    """Two products per side: 2·dim_a²·dim_g + 2·dim_a·dim_g² (per channel for depthwise blocks);
    0 for the per-feature blocks of normalization layers (a few flops per parameter)."""
    part = getattr(block, "part", None)  # DepthwiseConv2DBlock: one Kronecker block per channel
    if part is not None:
        return part.channels * (2.0 * part.dim_a**2 * part.dim_g + 2.0 * part.dim_a * part.dim_g**2)
    if hasattr(block, "dim_a") and hasattr(block, "dim_g"):
        return 2.0 * block.dim_a**2 * block.dim_g + 2.0 * block.dim_a * block.dim_g**2
    return 0.0


def preconditioning_flops(blocks) -> float:
    return sum(block_preconditioning_flops(b) for b in blocks)


def make_model(name: str) -> keras.Model:
    """A fresh model of the benchmark `name` (see MODELS)."""
    if name == "mlp":
        return mlp()
    if name == "cnn":
        return alexnet()
    if name == "vit":
        return vit()
    if name == "mobilenet_v2":
        _, shape, _ = MODELS[name]
        return keras_kfac.wrap(keras.applications.MobileNetV2(weights=None, input_shape=shape, classes=10))
    raise ValueError(f"unknown model {name!r}; choose among {', '.join(MODELS)}")


def variable_bytes(variables) -> int:
    """float32 bytes of `variables`."""
    return sum(4 * int(np.prod(v.shape)) for v in variables)


# Random labels: a small learning rate keeps every optimizer finite (a non-finite step would be
# skipped and cost less); the learning rate does not change the work a step does.
LEARNING_RATE = 1e-4


def configurations() -> dict:
    """name -> optimizer factory; K-FAC keeps all its defaults but the learning rate."""
    return {
        "sgd": lambda: keras.optimizers.SGD(LEARNING_RATE, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(LEARNING_RATE),
        "adamw": lambda: keras.optimizers.AdamW(LEARNING_RATE),
        "kfac (defaults)": lambda: keras_kfac.KFAC(learning_rate=LEARNING_RATE),
        "kfac (stats every step)": lambda: keras_kfac.KFAC(learning_rate=LEARNING_RATE, stats_every=1),
        "kfac (stats every step, 16 locations)": lambda: keras_kfac.KFAC(
            learning_rate=LEARNING_RATE, stats_every=1, stats_locations=16
        ),
        "kfac (no stats, no inversions)": lambda: keras_kfac.KFAC(
            learning_rate=LEARNING_RATE, stats_every=NEVER, inverse_every=NEVER
        ),
        "kfac (stats every step, no inversions)": lambda: keras_kfac.KFAC(
            learning_rate=LEARNING_RATE, stats_every=1, inverse_every=NEVER
        ),
        "kfac (same, empirical Fisher)": lambda: keras_kfac.KFAC(
            learning_rate=LEARNING_RATE, stats_every=1, inverse_every=NEVER, fisher="empirical"
        ),
        # A larger statistics sample (the study's lead at batch 128), with and without fewer
        # convolution locations for A.
        "kfac (stats of 128 examples)": lambda: keras_kfac.KFAC(
            learning_rate=LEARNING_RATE, stats_batch_size=128, stats_locations=None
        ),
        "kfac (stats of 128 examples, 16 locations)": lambda: keras_kfac.KFAC(
            learning_rate=LEARNING_RATE, stats_batch_size=128, stats_locations=16
        ),
        # The defaults before 2026-12-05: statistics of 32 examples, A from every location, no
        # weight average.
        "kfac (former defaults)": lambda: keras_kfac.KFAC(
            learning_rate=LEARNING_RATE, stats_batch_size=32, stats_locations=None, polynomial_averaging=None
        ),
        # The defaults from 2026-12-05 morning until that night: A from all 128 statistics
        # examples (now from the first 32).
        "kfac (A from all 128 examples)": lambda: keras_kfac.KFAC(
            learning_rate=LEARNING_RATE, input_stats_batch_size=None
        ),
        # Layers over sequences (the ViT's): KFAC-reduce instead of the default KFAC-expand.
        "kfac (KFAC-reduce)": lambda: keras_kfac.KFAC(learning_rate=LEARNING_RATE, weight_sharing="reduce"),
        # Automatic α, μ and Levenberg-Marquardt damping: two forward-mode passes per choice of
        # α, μ, one more forward pass per damping adaptation (every 5 steps).
        "kfac adaptive (alpha, mu every step)": lambda: keras_kfac.KFAC(
            learning_rate=None, momentum=None, adapt_damping=True, damping=150.0
        ),
        "kfac adaptive (adapt_every=5)": lambda: keras_kfac.KFAC(
            learning_rate=None, momentum=None, adapt_damping=True, damping=150.0, adapt_every=5
        ),
        # The same every step, the F·v products on the batch's first 32 examples only.
        "kfac adaptive (curvature_batch_size=32)": lambda: keras_kfac.KFAC(
            learning_rate=None, momentum=None, adapt_damping=True, damping=150.0, curvature_batch_size=32
        ),
    }


def configuration_names(text: str) -> list[str]:
    """The names of a comma-separated list; a comma inside parentheses belongs to its name
    ("kfac (stats every step, 16 locations)")."""
    return [name.strip() for name in re.split(r",(?![^(]*\))", text)]


# Needed for the breakdown; always run.
CORE = (
    "sgd",
    "adam",
    "kfac (defaults)",
    "kfac (no stats, no inversions)",
    "kfac (stats every step, no inversions)",
    "kfac (same, empirical Fisher)",
)


class Runner:
    """One model copy + optimizer, stepped one batch at a time through Keras' train function."""

    def __init__(self, model_name, weights, make_optimizer, x, y):
        self.model = make_model(model_name)
        self.model.set_weights(weights)
        self.model.compile(optimizer=make_optimizer(), loss="sparse_categorical_crossentropy")
        dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
        self.iterator = iter(dataset)
        self.model.make_train_function()
        self.function = self.model.train_function

    def step(self) -> float:
        start = time.perf_counter()
        logs = self.function(self.iterator)
        float(logs["loss"])  # wait for the step to finish
        return time.perf_counter() - start


def time_eigh(size: int, repeats: int, jit: bool) -> float:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * size, size)).astype("float32")
    matrix = tf.constant(x.T @ x / (2 * size))
    fn = tf.function(lambda m: tf.linalg.eigh(m), jit_compile=jit)
    fn(matrix)[0].numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(matrix)[0].numpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compiled_inversions(opt: keras_kfac.KFAC) -> tf.types.experimental.PolymorphicFunction:
    """The optimizer's inversions as its train step runs them: inside a graph, where
    `update_inverses` calls its compiled function (called eagerly it runs op by op, 2.2x to 8.5x
    as long for this script's models: BENCHMARKS.md, "The breakdown's inversion")."""
    return tf.function(opt.update_inverses, autograph=False)


def alternating_medians(calls: dict, repeats: int) -> dict:
    """{name: median seconds} of `repeats` calls of each zero-argument callable (each returns a
    tensor, read to wait for it), after one untimed call each, alternating between them."""
    for call in calls.values():
        call().numpy()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call().numpy()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_inversions(opt: keras_kfac.KFAC, repeats: int) -> float:
    """Median seconds of one call of `compiled_inversions(opt)` (after one untimed call)."""
    return alternating_medians({"compiled": compiled_inversions(opt)}, repeats)["compiled"]


def random_batch(model_name: str) -> tuple[tf.Tensor, tf.Tensor]:
    """The benchmark's batch for `model_name`: uniform images and random labels (seed 0)."""
    batch, input_shape, _ = MODELS[model_name]
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(batch, *input_shape)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=batch))
    return x, y


def inversion_calls(model_name: str, repeats: int) -> dict:
    """One call of `KFAC()`'s inversions on `model_name` (factors from three steps of random
    data), compiled as the train step runs it and called eagerly (as this script timed it
    before 2026-12-05), alternating; medians of `repeats` calls in ms."""
    x, y = random_batch(model_name)
    keras.utils.set_random_seed(0)
    runner = Runner(model_name, make_model(model_name).get_weights(), configurations()["kfac (defaults)"], x, y)
    for _ in range(3):
        runner.step()
    opt = runner.model.optimizer
    medians = alternating_medians({"compiled": compiled_inversions(opt), "eager": opt.update_inverses}, repeats)
    result = {f"{name}_ms": 1e3 * seconds for name, seconds in medians.items()}
    result["inverse_every"] = opt.inverse_every
    return result


def benchmark_model(
    model_name: str,
    batch: int,
    rounds: int,
    steps: int,
    only=None,
    warmup_steps: int | None = None,
    breakdown_configs: bool = True,
) -> dict:
    """Times every configuration (the core ones and `only`, all when None) on `model_name`;
    without `breakdown_configs` the core is Adam, the reference and K-FAC's defaults (the
    breakdown then has the reference step and the inversion only)."""
    reference_name = MODELS[model_name][2]
    core = CORE if breakdown_configs else ("adam", "kfac (defaults)")
    core += (reference_name,) if reference_name not in core else ()
    keras.utils.set_random_seed(0)
    reference = make_model(model_name)
    weights = reference.get_weights()
    x, y = random_batch(model_name)
    configs = {name: make for name, make in configurations().items() if only is None or name in core or name in only}
    inverse_every = keras_kfac.KFAC().inverse_every
    runners = {name: Runner(model_name, weights, make, x, y) for name, make in configs.items()}
    if warmup_steps is None:
        warmup_steps = max(3, inverse_every + 2)
    for runner in runners.values():  # warm-up: compilation, first statistics and inversion
        for _ in range(warmup_steps):
            runner.step()
    samples = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            samples[name].extend(runner.step() for _ in range(steps))
    result = {
        "model": model_name,
        "batch": batch,
        "steps_per_config": rounds * steps,
        "reference": reference_name,
        "configs": {},
    }
    adam_mean = statistics.fmean(samples["adam"])
    reference_mean = statistics.fmean(samples[reference_name])
    for name, values in samples.items():
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        result["configs"][name] = {
            "mean_ms": 1e3 * statistics.fmean(values),
            "median_ms": 1e3 * median,
            "iqr_ms": 1e3 * (q3 - q1),
            "ratio_to_adam": statistics.fmean(values) / adam_mean,
            "ratio_to_reference": statistics.fmean(values) / reference_mean,
        }
    for name, runner in runners.items():
        skipped = getattr(runner.model.optimizer, "skipped_steps", None)
        if skipped is not None and int(skipped.numpy()):
            raise RuntimeError(f"{name}: {int(skipped.numpy())} non-finite steps were skipped; timings invalid")
    opt = runners["kfac (defaults)"].model.optimizer
    inversion_ms = 1e3 * time_inversions(opt, repeats=5)
    c = result["configs"]
    breakdown = {f"{reference_name} step": c[reference_name]["mean_ms"]}
    if breakdown_configs:
        base = c["kfac (no stats, no inversions)"]["mean_ms"]
        stats = c["kfac (stats every step, no inversions)"]["mean_ms"]
        breakdown["preconditioning (+ bookkeeping)"] = base - c[reference_name]["mean_ms"]
        breakdown["statistics (per statistics step)"] = stats - base
        breakdown["of which the sampled targets' pass (sampled minus empirical Fisher)"] = (
            stats - c["kfac (same, empirical Fisher)"]["mean_ms"]
        )
    breakdown["inversion (per call)"] = inversion_ms
    breakdown["inversion (amortized over inverse_every)"] = inversion_ms / inverse_every
    result["breakdown_ms"] = breakdown
    blocks = opt.blocks
    factor_bytes = sum(variable_bytes(b.statistics_variables) for b in blocks)
    result["memory_mib"] = {
        "weights (blocks)": sum(variable_bytes(b.variables) for b in blocks) / 2**20,
        "factors A, G": factor_bytes / 2**20,  # the statistics (per-feature Fisher blocks of norm layers too)
        # What the default (factored) damping keeps besides the factors: the damped inverses.
        "inverses": (sum(b.memory_bytes() for b in blocks) - factor_bytes) / 2**20,
    }
    fb = forward_backward_flops(reference, batch)
    result["floor_ratio"] = 1.0 + preconditioning_flops(blocks) / fb
    result["gflop"] = {"forward+backward": fb / 1e9, "preconditioning": preconditioning_flops(blocks) / 1e9}
    return result


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def print_report(results: list, eigh: dict, info: dict) -> None:
    print(
        f"# step_time.py — {info['date']}, {info['cpu']}, {info['cores']} cores, "
        f"TF {info['tensorflow']}, Keras {info['keras']}"
    )
    for r in results:
        print(f"\n## {r['model']} at batch {r['batch']} ({r['steps_per_config']} timed steps per configuration)")
        label = REFERENCE_LABELS[r.get("reference", "adam")]
        times = f"x {label}"
        print(f"{'optimizer':40s} {'mean ms':>9s} {'median ms':>10s} {'IQR ms':>8s} {times:>7s}")
        for name, c in r["configs"].items():
            ratio = c.get("ratio_to_reference", c["ratio_to_adam"])
            print(f"{name:40s} {c['mean_ms']:9.2f} {c['median_ms']:10.2f} {c['iqr_ms']:8.2f} {ratio:7.2f}")
        print(f"floor (1 + preconditioning flops / forward-backward flops): {r['floor_ratio']:.2f}x {label}")
        print("K-FAC breakdown (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in r["breakdown_ms"].items()))
        print("memory (MiB): " + ", ".join(f"{k} {v:.2f}" for k, v in r["memory_mib"].items()))
    print("\n## eigendecomposition of one factor (median seconds)")
    for key, value in eigh.items():
        print(f"{key:40s} {value:8.3f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="steps per configuration per round")
    parser.add_argument("--models", default="mlp,cnn,vit,mobilenet_v2", help=f"among {', '.join(MODELS)}")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="untimed steps per configuration (default: inverse_every + 2)"
    )
    parser.add_argument(
        "--no-breakdown",
        action="store_true",
        help="time only Adam, the reference and K-FAC's defaults (no K-FAC variants for the breakdown)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--skip-eigh", action="store_true")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated configurations to add to the core ones (a comma inside a name's parentheses "
        "belongs to the name; default: all)",
    )
    parser.add_argument(
        "--inversions-only",
        action="store_true",
        help="time only one call of KFAC()'s inversions per model, compiled (as the train step runs "
        "it) and called eagerly, --rounds calls of each",
    )
    args = parser.parse_args(argv)

    def check_known(what: str, given, known) -> None:
        # A misspelt or renamed name (e.g. the former row "kfac (KFAC-expand)") must not vanish silently.
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"unknown {what} {unknown}; choose among {', '.join(known)}")

    only = None if args.only is None else configuration_names(args.only)
    check_known("configurations", only or (), configurations())
    if args.no_breakdown and only is None:
        only = []  # the short core alone
    names = args.models.split(",")
    check_known("models", names, MODELS)
    if args.inversions_only:
        calls = {m: inversion_calls(m, args.rounds) for m in names}
        info = machine()
        print(f"# step_time.py --inversions-only — {info['date']}, {info['cpu']}, {info['cores']} cores")
        for m, c in calls.items():
            print(
                f"{m}: one inversion call, compiled {c['compiled_ms']:.1f} ms, eager {c['eager_ms']:.1f} ms "
                f"({c['eager_ms'] / c['compiled_ms']:.2f}x); compiled per step at inverse_every="
                f"{c['inverse_every']}: {c['compiled_ms'] / c['inverse_every']:.2f} ms"
            )
        out = {"machine": info, "inversion_calls": calls}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        return out
    results = [
        benchmark_model(m, MODELS[m][0], args.rounds, args.steps, only, args.warmup_steps, not args.no_breakdown)
        for m in names
    ]
    eigh = {}
    if not args.skip_eigh:
        eigh["1024x1024, plain tf.function"] = time_eigh(1024, 5, jit=False)
        eigh["1024x1024, XLA"] = time_eigh(1024, 2, jit=True)
        eigh["4096x4096, plain tf.function"] = time_eigh(4096, 2, jit=False)
    info = machine()
    print_report(results, eigh, info)
    out = {"machine": info, "results": results, "eigh_seconds": eigh}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
