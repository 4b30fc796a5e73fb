"""K-FAC (KFAC-expand and KFAC-reduce) vs AdamW, Adam and Muon: a small ViT on Fashion-MNIST.

    python benchmarks/vit.py [--epochs 10] [--patch-size 4] [--seeds 0,1,2] [--batch-size 128] [--sweep-steps 0]
                             [--learning-rates 3e-4,1e-3,3e-3,1e-2] [--kinds kfac_expand,...]
                             [--sweep-only] [--data-dir DIR] [--out benchmarks/results] [--resume]

Model: `keras_kfac.models.vit()` (4x4 patches, position Embedding, four pre-LN Transformer blocks
of width 64 with 4 heads and a 128-unit gelu MLP, mean pooling; 138,890 parameters, all under
curvature blocks; `--patch-size 7`: 16 tokens of 7x7 pixels, the same parameter count, about a
quarter of the step time on CPU).  The protocol is `compare_optimizers.py`'s (`compare.run_benchmark`):

1. **Sweep** (seed 0) of the first-order optimizers: every learning rate of `--learning-rates`
   (default 3e-4 .. 1e-2, 33x), each constant and with a linear warm-up over the first 5% of the
   run followed by a cosine decay to zero (`keras.optimizers.schedules.CosineDecay`), trains on
   the training set minus its last 5,000 examples for `--sweep-steps` steps (default: `--epochs`
   epochs of it) and is scored by its accuracy on those 5,000; the test set is never looked at.  The schedule
   of a candidate spans its own run: the sweep's steps there, the full run's steps afterwards.
   AdamW keeps Keras' weight decay (0.004); Muon is Keras' (Newton-Schulz orthogonalized
   momentum for 2-D kernels, i.e. the MLP layers; its AdamW step for everything else: the 3-D
   MultiHeadAttention kernels, the convolution, the embedding, the norms and the softmax head,
   which `exclude_layers` leaves to AdamW as Keras advises).  K-FAC is not swept:
   `KFAC(weight_sharing="expand")` (row `kfac_expand`, the same as `KFAC()`: this benchmark chose
   it as the default, with the default step of 2026-12-04 evening) and
   `KFAC(weight_sharing="reduce")` (row `kfac_reduce`), package defaults otherwise.
2. **Runs**: every kind trains on the full training set for `--epochs` epochs from the same
   initial weights (per seed) and the same batches.  Train loss every step, test accuracy
   `--evals-per-epoch` times an epoch (all 10,000 test images), wall-clock of the training steps
   alone.

Writes `<out>/vit_b<batch>.json` (`vit_p<size>_b<batch>.json` for other patch sizes) after every
run (`--resume` keeps the sweep and the finished runs when the keras_kfac sources and the run
settings are unchanged; kinds added later are swept then), three PNG plots (same name,
`_*.png`: train loss vs steps, test accuracy vs steps and vs seconds; mean and min-max band over
seeds) and prints a table: steps and seconds to the
best first-order optimizer's final test accuracy (mean over seeds; "—" when a seed never gets
there), final test accuracy, final train loss (50-step moving average), mean step time and its
ratio to AdamW's.  `--max-steps N` (with a small `--sweep-steps`) is a smoke run.
"""

from __future__ import annotations

import argparse
import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import compare_optimizers as compare  # noqa: E402

from keras_kfac.models import vit  # noqa: E402

KINDS = ("kfac_expand", "kfac_reduce", "adamw", "adam", "muon")
FIRST_ORDER = ("adamw", "adam", "muon")
LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2)
KFAC_SETTINGS = {"kfac_expand": {"weight_sharing": "expand"}, "kfac_reduce": {"weight_sharing": "reduce"}}
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
    return compare.sweep_table(KFAC_SETTINGS, {kind: tuple(learning_rates) for kind in FIRST_ORDER})


def builder(patch_size: int = 4):
    """The benchmark's model constructor: `keras_kfac.models.vit` with square patches of this side."""
    return functools.partial(vit, patch_size=patch_size)


def benchmark(learning_rates=LEARNING_RATES, patch_size: int = 4) -> compare.Benchmark:
    build = builder(patch_size)
    tokens = (28 // patch_size) ** 2
    return compare.Benchmark(
        name="vit" if patch_size == 4 else f"vit_p{patch_size}",
        title=f"ViT ({tokens} patches of {patch_size}x{patch_size}, {build().count_params():,} parameters)",
        build=build,
        kinds=KINDS,
        first_order=FIRST_ORDER,
        table=sweep_table(learning_rates),
        colors=COLORS,
        reference="adamw",
        accuracy_range=(0.5, 0.95),
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rates", default=",".join(map(str, LEARNING_RATES)), help="the sweep's grid")
    parser.add_argument("--patch-size", type=int, default=4, help="side of the square patches (4: 49 tokens, 7: 16)")
    compare.add_arguments(parser, benchmark(), epochs=10)
    parser.set_defaults(evals_per_epoch=5)
    args = parser.parse_args(argv)
    bench = benchmark([float(v) for v in args.learning_rates.split(",")], args.patch_size)
    return compare.run_benchmark(bench, args, args.batch_size)


if __name__ == "__main__":
    main()
