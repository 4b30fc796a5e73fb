"""K-FAC (KFAC-expand and KFAC-reduce) vs AdamW, Adam and Muon: a small ViT on Fashion-MNIST.

    python benchmarks/vit.py [--epochs 10] [--seeds 0,1,2] [--batch-size 128] [--sweep-steps 0]
                             [--learning-rates 3e-4,1e-3,3e-3,1e-2] [--kinds kfac_expand,...]
                             [--data-dir DIR] [--out benchmarks/results] [--resume] [--max-steps N]

Model: `keras_kfac.models.vit()` (4x4 patches, position Embedding, four pre-LN Transformer blocks
of width 64 with 4 heads and a 128-unit gelu MLP, mean pooling; 138,890 parameters, all under
curvature blocks).  The protocol is `compare_optimizers.py`'s, whose helpers it imports:

1. **Sweep** (seed 0) of the first-order optimizers: every learning rate of `--learning-rates`
   (default 3e-4 .. 1e-2, 33x), each constant and with a linear warm-up over the first 5% of the
   run followed by a cosine decay to zero (`keras.optimizers.schedules.CosineDecay`), trains on
   the training set minus its last 5,000 examples for `--sweep-steps` steps (default: one epoch)
   and is scored by its accuracy on those 5,000; the test set is never looked at.  The schedule
   of a candidate spans its own run: the sweep's steps there, the full run's steps afterwards.
   AdamW keeps Keras' weight decay (0.004); Muon is Keras' (Newton-Schulz orthogonalized
   momentum for 2-D kernels, i.e. the MLP layers; its AdamW step for everything else: the 3-D
   MultiHeadAttention kernels, the convolution, the embedding, the norms and the softmax head,
   which `exclude_layers` leaves to AdamW as Keras advises).  K-FAC is not swept: `KFAC()`
   (row `kfac_expand`) and `KFAC(weight_sharing="reduce")` (row `kfac_reduce`), package defaults.
2. **Runs**: every kind trains on the full training set for `--epochs` epochs from the same
   initial weights (per seed) and the same batches.  Train loss every step, test accuracy
   `--evals-per-epoch` times an epoch (all 10,000 test images), wall-clock of the training steps
   alone.

Writes `<out>/vit_b<batch>.json` after every run (`--resume` keeps the sweep and the finished runs
when the keras_kfac sources and the run settings are unchanged; kinds added later are swept
then), three PNG plots (`<out>/vit_b<batch>_*.png`: train loss vs steps, test accuracy vs steps
and vs seconds; mean and min-max band over seeds) and prints a table: steps and seconds to the
best first-order optimizer's final test accuracy (mean over seeds; "—" when a seed never gets
there), final test accuracy, final train loss (50-step moving average), mean step time and its
ratio to AdamW's.  `--max-steps N` (with a small `--sweep-steps`) is a smoke run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import compare_optimizers as compare  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac.datasets import load_arrays  # noqa: E402
from keras_kfac.models import vit  # noqa: E402

KINDS = ("kfac_expand", "kfac_reduce", "adamw", "adam", "muon")
FIRST_ORDER = ("adamw", "adam", "muon")
LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2)
SCHEDULES = ("constant", "cosine")
WARMUP_FRACTION = 0.05  # of the run's steps, before the cosine decay
KFAC_SETTINGS = {"kfac_expand": {}, "kfac_reduce": {"weight_sharing": "reduce"}}
COLORS = {
    "kfac_expand": "tab:red",
    "kfac_reduce": "tab:orange",
    "adamw": "tab:blue",
    "adam": "tab:cyan",
    "muon": "tab:green",
}


def sweep_table(learning_rates) -> dict:
    """kind -> candidate settings: every learning rate with each schedule for the first-order
    optimizers, the one K-FAC setting otherwise (kept untrained)."""
    table = {kind: [settings] for kind, settings in KFAC_SETTINGS.items()}
    for kind in FIRST_ORDER:
        table[kind] = [{"learning_rate": lr, "schedule": s} for lr in learning_rates for s in SCHEDULES]
    return table


def learning_rate(settings: dict, total_steps: int):
    """A constant rate, or linear warm-up over `WARMUP_FRACTION` of `total_steps` to it followed by a
    cosine decay to zero at `total_steps`."""
    rate = settings["learning_rate"]
    if settings.get("schedule", "constant") == "constant":
        return rate
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total_steps - warmup), warmup_target=rate, warmup_steps=warmup
    )


def make_optimizer(kind: str, settings: dict, total_steps: int) -> keras.optimizers.Optimizer:
    """The optimizer of a row: `KFAC(**settings)` or a first-order optimizer with its schedule."""
    if kind.startswith("kfac"):
        return keras_kfac.KFAC(**settings)
    rate = learning_rate(settings, total_steps)
    if kind == "adamw":
        return keras.optimizers.AdamW(rate)
    if kind == "adam":
        return keras.optimizers.Adam(rate)
    if kind == "muon":
        return keras.optimizers.Muon(rate, exclude_layers=["predictions"])
    raise ValueError(f"unknown kind {kind!r}")


def label(kind: str, settings: dict) -> str:
    """Short description of a row's settings for the table."""
    if kind.startswith("kfac"):
        arguments = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        return f"KFAC({arguments})"
    return f"lr {settings['learning_rate']:g}, {settings.get('schedule', 'constant')}"


def run(kind, settings, weights, data, batch_size, seed, epochs, eval_every, eval_data, max_steps) -> dict:
    """One training run (compare_optimizers.train with the ViT and this benchmark's optimizers)."""
    total = epochs * (len(data[1]) // batch_size)
    if max_steps:
        total = min(total, max_steps)
    make = functools.partial(make_optimizer, total_steps=total)
    return compare.train(
        kind, settings, weights, data, batch_size, seed, epochs, eval_every, eval_data, max_steps, build=vit, make=make
    )


def sweep(table: dict, train_arrays, batch_size: int, steps: int) -> dict:
    """Validation sweep of `table` (seed 0), as in compare_optimizers.sweep."""
    x, y = train_arrays
    fit_data = (x[: -compare.VALIDATION_SIZE], y[: -compare.VALIDATION_SIZE])
    val = (tf.constant(x[-compare.VALIDATION_SIZE :].astype("float32") / 255.0), y[-compare.VALIDATION_SIZE :])
    weights = compare.initial_weights(0, vit)

    def score(kind, settings):
        result = run(kind, settings, weights, fit_data, batch_size, 0, 1000, steps, val, steps)
        return result["evals"][-1]["accuracy"], result["skipped_steps"]

    return compare.run_sweep(table, score, "val_accuracy")


def mean_step_seconds(result: dict) -> float:
    """Mean step time without the first five steps (fewer in smoke runs)."""
    seconds = result["step_seconds"]
    return statistics.fmean(seconds[5:] or seconds[1:] or seconds)


def complete_seeds(runs: dict) -> list:
    """Seeds finished by every kind that has runs."""
    done = [{r["seed"] for r in results} for results in runs.values() if results]
    return sorted(set.intersection(*done)) if done else []


def summarize(runs: dict) -> dict:
    """Per kind: the table's entries, means over seeds (None when a seed never got there)."""
    finals = {kind: statistics.fmean(r["evals"][-1]["accuracy"] for r in results) for kind, results in runs.items()}
    first_order = [kind for kind in FIRST_ORDER if kind in runs]
    best = max(first_order, key=finals.get) if first_order else None
    target = finals[best] if best else None
    adamw_step = statistics.fmean(map(mean_step_seconds, runs["adamw"])) if "adamw" in runs else None
    table = {"_best_first_order": best, "_target_accuracy": target}
    for kind, results in runs.items():
        steps, seconds = [], []
        for r in results:
            evals = r["evals"]
            step = (
                None
                if target is None
                else compare.first_step([e["step"] for e in evals], [e["accuracy"] for e in evals], target - 1e-9)
            )
            steps.append(step)
            seconds.append(None if step is None else next(e["seconds"] for e in evals if e["step"] == step))
        step_ms = 1e3 * statistics.fmean(map(mean_step_seconds, results))
        table[kind] = {
            "settings": results[0]["settings"],
            "steps_to_target": None if None in steps else statistics.fmean(steps),
            "seconds_to_target": None if None in seconds else statistics.fmean(seconds),
            "seeds_reaching_target": sum(s is not None for s in steps),
            "final_test_accuracy": finals[kind],
            "final_train_loss": statistics.fmean(compare.smoothed(r["losses"])[-1] for r in results),
            "mean_step_ms": step_ms,
            "step_ratio_to_adamw": None if adamw_step is None else step_ms / (1e3 * adamw_step),
            "skipped_steps": sum(r["skipped_steps"] for r in results),
            "seeds": [r["seed"] for r in results],
        }
    return table


def markdown(batch_size: int, table: dict, seeds: list) -> str:
    """The table as markdown."""
    best, target = table["_best_first_order"], table["_target_accuracy"]
    goal = f"{best}'s final acc. ({target:.4f})" if best else "best first-order final acc. (none run)"
    lines = [
        f"### ViT, Fashion-MNIST, batch {batch_size} ({len(seeds)} seed(s): {', '.join(map(str, seeds))}; "
        "mean over seeds)",
        "",
        f"| optimizer | settings | steps to {goal} | s to it | final test acc. | final train loss "
        "| step ms | x AdamW |",
        "|---|" + "---|" * 7,
    ]
    for kind in (k for k in KINDS if k in table):
        r = table[kind]
        lines.append(
            f"| {kind} | {label(kind, r['settings'])} | {compare.fmt(r['steps_to_target'])} "
            f"| {compare.fmt(r['seconds_to_target'])} | {r['final_test_accuracy']:.4f} | {r['final_train_loss']:.4f} "
            f"| {r['mean_step_ms']:.1f} | {compare.fmt(r['step_ratio_to_adamw'], 2)} |"
        )
    return "\n".join(lines)


def finished(runs: dict) -> tuple[list, dict]:
    """(seeds every kind with runs has finished, those runs per kind)."""
    seeds = complete_seeds(runs)
    return seeds, {kind: [r for r in done if r["seed"] in seeds] for kind, done in runs.items() if done}


def report(batch_size: int, runs: dict, out: str) -> dict:
    """Prints the table of the finished runs and draws the plots; returns the table and more."""
    seeds, complete = finished(runs)
    table = summarize(complete)
    text = markdown(batch_size, table, seeds)
    note = compare.sources_note(complete)
    if note:
        text += "\n\n" + note
    print(text, flush=True)
    plots = compare.plot(
        batch_size,
        complete,
        out,
        colors=COLORS,
        title=f"ViT ({vit().count_params():,} parameters)",
        prefix="vit_",
        accuracy_range=(0.5, 0.95),
    )
    return {"table": table, "table_markdown": text, "plots": plots}


def save_results(path: str, settings: dict, chosen: dict, runs: dict, batch_size: int, out: str, final: bool) -> dict:
    """Writes the sweep and the runs so far; the final call adds the table and the plots."""
    record = {
        "argv": sys.argv[1:],
        "source_digest": compare.source_digest(),
        "settings": settings,
        "sweep": chosen,
        "runs": runs,
    }
    if final:
        record |= report(batch_size, runs, out)
    with open(path, "w") as f:
        json.dump(record, f)
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--sweep-steps", type=int, default=0, help="steps per sweep candidate (0: one epoch)")
    parser.add_argument("--learning-rates", default=",".join(map(str, LEARNING_RATES)), help="the sweep's grid")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"rows to train, among {', '.join(KINDS)}")
    parser.add_argument("--evals-per-epoch", type=int, default=5, help="test-set evaluations per epoch")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run early (smoke tests)")
    parser.add_argument(
        "--resume", action="store_true", help="keep the sweep and the finished runs saved in --out (same settings)"
    )
    parser.add_argument("--from-json", action="store_true", help="only re-print the table and plots saved in --out")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose among {', '.join(KINDS)}")
    path = os.path.join(args.out, f"vit_b{args.batch_size}.json")
    if args.from_json:
        with open(path) as f:
            return report(args.batch_size, json.load(f)["runs"], args.out)
    os.makedirs(args.out, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = load_arrays("fashion_mnist", args.data_dir)
    test = (tf.constant(x_test.astype("float32") / 255.0), y_test)
    seeds = [int(s) for s in args.seeds.split(",")]
    steps_per_epoch = len(x_train) // args.batch_size
    sweep_steps = args.sweep_steps or (len(x_train) - compare.VALIDATION_SIZE) // args.batch_size
    eval_every = max(1, steps_per_epoch // args.evals_per_epoch)
    if args.max_steps:
        eval_every = min(eval_every, max(1, args.max_steps // 3))
    table = sweep_table([float(v) for v in args.learning_rates.split(",")])
    # What a resumed benchmark must share with the saved one.
    settings = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "sweep_steps": sweep_steps,
        "max_steps": args.max_steps,
        "eval_every": eval_every,
        "sweep_table": table,
    }
    print(f"# vit.py {' '.join(sys.argv[1:])} — {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    chosen, saved_runs = compare.saved_sweep_and_runs(path, table, args.resume, [], seeds)
    if chosen is not None:
        with open(path) as f:
            saved_settings = json.load(f).get("settings")
        if saved_settings != json.loads(json.dumps(settings)):
            raise SystemExit(f"{path} was written with other settings ({saved_settings}); rerun without --resume.")
    chosen = chosen or {}
    missing = {kind: table[kind] for kind in kinds if kind not in chosen}
    if missing:
        chosen |= sweep(missing, (x_train, y_train), args.batch_size, sweep_steps)
    runs = {kind: [] for kind in KINDS} | saved_runs
    for seed in seeds:
        weights = compare.initial_weights(seed, vit)
        for kind in kinds:
            if any(r["seed"] == seed for r in runs[kind]):
                continue
            result = run(
                kind,
                chosen[kind]["best"],
                weights,
                (x_train, y_train),
                args.batch_size,
                seed,
                args.epochs,
                eval_every,
                test,
                args.max_steps,
            )
            runs[kind].append(result)
            print(
                f"  seed {seed} {kind} ({label(kind, chosen[kind]['best'])}): final test accuracy "
                f"{result['evals'][-1]['accuracy']:.4f}, {1e3 * mean_step_seconds(result):.1f} ms/step",
                flush=True,
            )
            save_results(path, settings, chosen, runs, args.batch_size, args.out, final=False)  # for --resume
    return save_results(path, settings, chosen, runs, args.batch_size, args.out, final=True)


if __name__ == "__main__":
    main()
