"""benchmarks/weight_averaging.py with more averages kept beside the weights (this study's runs).

    python benchmarks/results/study/average_eta/widened_averages.py --seed 0 --eval-every 46 \
        --config "KFAC(polynomial_averaging=None)" --data-dir ../shared/data/fashion_mnist --out OUT

Seeds 0-2 ran with the six averages below; seeds 3 and 4 with poly8, poly16 and ema0.99 only.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))

import weight_averaging  # noqa: E402

weight_averaging.AVERAGES.clear()
weight_averaging.AVERAGES.update(
    {
        "poly4": ("poly", 4),
        "poly8": ("poly", 8),
        "poly16": ("poly", 16),
        "poly32": ("poly", 32),
        "ema0.98": ("ema", 0.98),
        "ema0.99": ("ema", 0.99),
    }
)

if __name__ == "__main__":
    weight_averaging.main(sys.argv[1:])
