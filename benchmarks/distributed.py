"""K-FAC step time with 1 and 2 replicas (MirroredStrategy over logical CPU devices) and the
bytes each replica all-reduces, against the bytes of the gradients.

    python benchmarks/distributed.py [--rounds 2] [--steps 25] [--models mlp,cnn] [--json out.json]

Models as in `benchmarks/step_time.py`: MLP 784-256-256-10 at global batch 256 and the
AlexNet-style CNN at global batch 128, K-FAC with its defaults (statistics every 10 steps,
inversions every 50) and a small learning rate (random labels). Configurations: one device
without a strategy; MirroredStrategy with 1 replica; with 2 replicas (inversions split between
them, `distribute_inverses=True`); with 2 replicas that both invert every block. Each copy of
the model warms up (compilation, first statistics and inversion), then the configurations are
timed in interleaved rounds; with `steps * rounds >= 50` the mean contains one inversion.

The two replicas are logical devices of one CPU: they share its cores, so the figures show the
overhead of the strategy and of its all-reduces, not a speed-up. Bytes are the payload of each
all-reduce as K-FAC calls it (recorded when the step is traced) and Keras' gradient all-reduce
(the trainable variables' size); a ring all-reduce sends about 2 (N - 1) / N times the payload
per replica.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac import distributed  # noqa: E402
from keras_kfac.models import alexnet, mlp  # noqa: E402

LEARNING_RATE = 1e-4
BATCH = {"mlp": 256, "cnn": 128}
PAYLOAD = {}  # all-reduce call site -> bytes, filled while the step is traced


def _recording_all_reduce(original):
    def all_reduce(values, op="mean"):
        import inspect

        caller = inspect.stack()[1].function
        PAYLOAD[caller] = sum(4 * int(np.prod(v.shape)) for v in values)
        return original(values, op)

    return all_reduce


distributed.all_reduce = _recording_all_reduce(distributed.all_reduce)


# One strategy object per device set for the whole process: a second one would reuse its
# collective keys for tensors of other shapes.
STRATEGIES = {}


def configurations() -> dict:
    """name -> (strategy or None, KFAC keyword arguments)."""
    if not STRATEGIES:
        STRATEGIES[1] = tf.distribute.MirroredStrategy(["/cpu:0"])
        STRATEGIES[2] = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    two = STRATEGIES[2]
    return {
        "1 device, no strategy": (None, {}),
        "MirroredStrategy, 1 replica": (STRATEGIES[1], {}),
        "MirroredStrategy, 2 replicas": (two, {}),
        "MirroredStrategy, 2 replicas, every replica inverts all": (two, {"distribute_inverses": False}),
    }


class _StepTimer(keras.callbacks.Callback):
    """Wall time of each training step (the loss is read, so the step has finished)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])
        self.times.append(time.perf_counter() - self.start)


class Runner:
    """One model copy under one strategy, trained with `fit` as a user would."""

    def __init__(self, model_name, weights, strategy, kwargs, x, y, steps_in_data):
        scope = strategy.scope() if strategy is not None else _no_scope()
        with scope:
            self.model = mlp() if model_name == "mlp" else alexnet()
            self.model.set_weights(weights)
            self.model.compile(
                optimizer=keras_kfac.KFAC(learning_rate=LEARNING_RATE, **kwargs),
                loss="sparse_categorical_crossentropy",
            )
        self.x, self.y = x, y
        self.steps_in_data = steps_in_data

    def steps(self, count: int) -> list:
        timer = _StepTimer()
        batch = len(self.x) // self.steps_in_data
        self.model.fit(
            self.x[: batch * count],
            self.y[: batch * count],
            batch_size=batch,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[timer],
        )
        return timer.times


class _no_scope:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def benchmark(model_name: str, rounds: int, steps: int) -> dict:
    batch = BATCH[model_name]
    keras.utils.set_random_seed(0)
    reference = mlp() if model_name == "mlp" else alexnet()
    weights = reference.get_weights()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(batch * steps, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=batch * steps)
    runners = {}
    payload = {}
    for name, (strategy, kwargs) in configurations().items():
        PAYLOAD.clear()
        runners[name] = Runner(model_name, weights, strategy, kwargs, x, y, steps)
        runners[name].steps(3)  # compilation, first statistics and inversion
        payload[name] = dict(PAYLOAD)
    samples = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            samples[name].extend(runner.steps(steps))
    for name, runner in runners.items():
        if int(runner.model.optimizer.skipped_steps.numpy()):
            raise RuntimeError(f"{name}: non-finite steps were skipped; timings invalid")
    base = statistics.fmean(samples["1 device, no strategy"])
    result = {"model": model_name, "global_batch": batch, "steps_per_config": rounds * steps, "configs": {}}
    for name, values in samples.items():
        result["configs"][name] = {
            "mean_ms": 1e3 * statistics.fmean(values),
            "median_ms": 1e3 * statistics.median(values),
            "x_one_device": statistics.fmean(values) / base,
        }
    opt = runners["MirroredStrategy, 2 replicas"].model.optimizer
    blocks = opt.blocks
    gradient_bytes = sum(4 * int(np.prod(v.shape)) for v in reference.trainable_variables)
    two = payload["MirroredStrategy, 2 replicas"]
    result["bytes"] = {
        "gradients (Keras' all-reduce, every step)": gradient_bytes,
        "factors A, G (every statistics step)": two.get("reduce_statistics", 0),
        "factors, computed from the blocks": sum(4 * (b.dim_a**2 + b.dim_g**2) for b in blocks),
        "inverses (every inversion step, distribute_inverses=True)": two.get("update_inverses", 0),
        "non-finite flag (every step)": two.get("kfac_step", 0),
    }
    result["bytes_per_step_at_defaults"] = (
        gradient_bytes
        + result["bytes"]["non-finite flag (every step)"]
        + result["bytes"]["factors A, G (every statistics step)"] / opt.stats_every
        + result["bytes"]["inverses (every inversion step, distribute_inverses=True)"] / opt.inverse_every
    )
    owners = distributed.owners([distributed.inverse_cost(b) for b in blocks], 2)
    costs = [distributed.inverse_cost(b) for b in blocks]
    result["inversion_cost_share"] = [sum(c for c, o in zip(costs, owners) if o == r) / sum(costs) for r in (0, 1)]
    return result


def report(results: list) -> str:
    lines = []
    for r in results:
        lines.append(f"## {r['model']}, global batch {r['global_batch']}, {r['steps_per_config']} steps each")
        lines.append("| configuration | mean ms | median ms | x one device |")
        lines.append("|---|---|---|---|")
        for name, c in r["configs"].items():
            lines.append(f"| {name} | {c['mean_ms']:.2f} | {c['median_ms']:.2f} | {c['x_one_device']:.2f} |")
        lines.append("")
        lines.append("| all-reduce payload | MiB | x gradients |")
        lines.append("|---|---|---|")
        grad = r["bytes"]["gradients (Keras' all-reduce, every step)"]
        for name, b in r["bytes"].items():
            lines.append(f"| {name} | {b / 2**20:.3f} | {b / grad:.2f} |")
        per_step = r["bytes_per_step_at_defaults"]
        lines.append(
            f"| all of it per step at the defaults (amortized) | {per_step / 2**20:.3f} | {per_step / grad:.2f} |"
        )
        share = ", ".join(f"{s:.0%}" for s in r["inversion_cost_share"])
        lines.append(f"\nInversion cost (dim_a³ + dim_g³) per replica with 2 replicas: {share}.\n")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    for name in args.models.split(","):
        results.append(benchmark(name, args.rounds, args.steps))
        print(report(results[-1:]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
