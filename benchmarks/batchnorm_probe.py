"""A first look at K-FAC on BatchNormalization networks (issue on modern layers), side by side.

    python benchmarks/batchnorm_probe.py --model mobilenet --optimizer adam
    python benchmarks/batchnorm_probe.py --model mobilenet --optimizer "KFAC(learning_rate=3e-4)"

`keras.applications.MobileNetV2` or `ResNet50` (weights=None, 32x32x3 inputs, 10 classes) on 128
random images with random labels, batch 16, 3 epochs of 8 steps, seed 0; prints the per-epoch
mean training loss, the evaluated loss and, for K-FAC, the share of parameters under blocks.
`--optimizer` is "adam" (Adam(1e-3)) or a `KFAC(...)` expression with keras_kfac's arguments.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_kfac  # noqa: E402


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("mobilenet", "resnet50"), default="mobilenet")
    parser.add_argument("--optimizer", default="KFAC()")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=128)
    application = keras.applications.MobileNetV2 if args.model == "mobilenet" else keras.applications.ResNet50
    model = keras_kfac.wrap(application(weights=None, input_shape=(32, 32, 3), classes=10))
    if args.optimizer == "adam":
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        optimizer = eval(args.optimizer, {"KFAC": keras_kfac.KFAC, "keras": keras})  # a KFAC(...) expression
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    losses = model.fit(x, y, batch_size=16, epochs=args.epochs, verbose=0).history["loss"]
    print(args.model, args.optimizer, "epoch losses", [round(v, 3) for v in losses])
    print("evaluated loss", round(model.evaluate(x, y, verbose=0), 3))
    if isinstance(optimizer, keras_kfac.KFAC):
        print(model.kfac_summary(print_fn=None).splitlines()[-1])
    return losses


if __name__ == "__main__":
    main()
