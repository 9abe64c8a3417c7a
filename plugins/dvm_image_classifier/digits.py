"""scikit-learn's handwritten digits as an image-classification dataset, for demos and tests.

    python -m dvm_image_classifier.digits [--out DIR] [--seed 0] [--test-fraction 0.2]

writes DIR/digits_train.npz (send it as an image-classifier job's dataset) and
DIR/digits_test.npz (keep it to check the trained model). Each holds ``x``, uint8 images N×8×8
(the 0-16 grey levels scaled to 0-255), ``y``, the digit labels, and ``classes``, their names
"0".."9". The split is a permutation by numpy's ``default_rng(seed)``, the first
``test_fraction`` of it held out: 1438 training and 359 test images by default.

Needs scikit-learn (the data ships inside it: no download).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASSES = tuple(str(i) for i in range(10))


def digits_split(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): digits as uint8 N×8×8 images and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the digits come with scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    x = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = round(len(x) * test_fraction)
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]


def write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """An .npz as the image classifier reads it, with the digits' class names."""
    np.savez_compressed(path, x=x, y=y, classes=np.array(CLASSES))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dvm_image_classifier.digits",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    x_train, y_train, x_test, y_test = digits_split(args.seed, args.test_fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("digits_train.npz", x_train, y_train), ("digits_test.npz", x_test, y_test)):
        write_npz(args.out / name, x, y)
        print(f"{args.out / name}: {len(x)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
