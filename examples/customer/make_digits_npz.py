"""Write scikit-learn's digits as train/test .npz files for the image-classifier job (kind 5750).

    python examples/customer/make_digits_npz.py [--out DIR] [--seed 0] [--test-fraction 0.2]

Writes DIR/digits_train.npz (send it as the job's dataset) and DIR/digits_test.npz (keep it to
check the trained model with classify_digits.py). The same as
``python -m dvm_image_classifier.digits``: see that module for the format and the split.
"""

from __future__ import annotations

from dvm_image_classifier.digits import digits_split, main  # noqa: F401  (digits_split: for importers)

if __name__ == "__main__":
    raise SystemExit(main())
