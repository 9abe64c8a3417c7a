"""Check a trained image classifier (the result of an image-classifier job) on held-out digits.

    python examples/customer/classify_digits.py model.safetensors model_card.json [--test digits_test.npz]

Loads the model with dvm_image_classifier.predict.load_model (weights from safetensors, the
network rebuilt from the model card) and prints its accuracy on the digits the training set
left out: by default the split of make_digits_npz.py (seed 0, 20% held out), or the
images and labels of an .npz given with --test (read with allow_pickle=False).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dvm_image_classifier.predict import load_model



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path, help="model.safetensors from the job's result")
    parser.add_argument("card", type=Path, help="model_card.json from the job's result")
    parser.add_argument("--test", type=Path, help="an .npz with x (uint8 images) and y (labels)")
    parser.add_argument("--seed", type=int, default=0, help="the split's seed (without --test)")
    args = parser.parse_args()

    if args.test:
        with np.load(args.test, allow_pickle=False) as data:
            x_test, y_test = data["x"], data["y"]
    else:
        from dvm_image_classifier.digits import digits_split
        _, _, x_test, y_test = digits_split(args.seed)

    model, preprocess = load_model(args.weights, args.card)
    with torch.no_grad():
        predicted = model(preprocess(x_test)).argmax(1).numpy()
    # The model's outputs follow the card's class names; the digits' names are their labels.
    names = np.array([int(name) for name in preprocess.classes])
    accuracy = float((names[predicted] == y_test).mean())
    print(f"{len(y_test)} held-out digits, accuracy {accuracy:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
