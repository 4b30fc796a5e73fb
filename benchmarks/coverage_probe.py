"""Last-epoch training losses of optimizer expressions on the five small synthetic models of
`tests/test_coverage.py` (48 steps of batch 16 on 128 examples), from that test's weights and data.

    python benchmarks/coverage_probe.py vit,mobilenet_style,resnet_bn,conv1d,text_transformer "KFAC()" "adam" ...

Each expression is a `KFAC(...)` call (or "adam" for Adam(1e-3), the test's reference); every
model is trained by `tests/test_coverage.train` (same batches, no shuffling) for each of them.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import test_coverage  # noqa: E402

import keras_kfac  # noqa: E402


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    names, expressions = argv[0].split(","), argv[1:]
    for name in names:
        build, make_data, count, epochs = test_coverage.MODELS[name]
        x, y = make_data(np.random.default_rng(0), count)
        keras.utils.set_random_seed(0)
        weights = build().get_weights()
        for expression in expressions:
            if expression == "adam":
                optimizer = keras.optimizers.Adam(1e-3)
            else:
                optimizer = eval(expression, {"KFAC": keras_kfac.KFAC, "keras": keras})
            losses, _ = test_coverage.train(build, weights, optimizer, x, y, epochs)
            print(f"{name:18s} {expression:70s} last {losses[-1]:.3f}  {np.round(losses, 3).tolist()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
