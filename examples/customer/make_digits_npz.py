"""Write scikit-learn's digits as train/test .npz files for the image-classifier job (kind 5750).

    python examples/customer/make_digits_npz.py [--out DIR] [--seed 0] [--test-fraction 0.2]

Writes DIR/digits_train.npz (send it as the job's dataset) and DIR/digits_test.npz (keep it to
check the trained model with classify_digits.py). Each holds x, uint8 images N×8×8 (the 0-16
grey levels scaled to 0-255), y, the digit labels, and classes, their names "0".."9".
The split is the one tests/test_image_classifier.py uses: a permutation by numpy's
default_rng(seed), the first test_fraction of it held out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def digits_split(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): digits as uint8 N×8×8 images and int64 labels."""
    from sklearn.datasets import load_digits  # scikit-learn ships the data: no download

    digits = load_digits()
    x = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = round(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = digits_split(args.seed, args.test_fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    classes = np.array([str(i) for i in range(10)])
    for name, x, y in (("digits_train.npz", x_train, y_train), ("digits_test.npz", x_test, y_test)):
        np.savez_compressed(args.out / name, x=x, y=y, classes=classes)
        print(f"{args.out / name}: {len(x)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
