"""Using a trained classifier: rebuild it from its model card and weights, preprocess, classify.

    from dvm_image_classifier.predict import load_model, classify
    model, preprocess = load_model("model.safetensors", "model_card.json")
    with torch.no_grad():
        indices = model(preprocess(images)).argmax(1)       # images: uint8 N×H×W[×C] or PIL images
    names = [preprocess.classes[i] for i in indices]        # or: classify(model, preprocess, images)
    predict(model, preprocess, images)                      # [(name, probability), ...]

From a shell: ``python -m dvm_image_classifier.predict model.safetensors model_card.json
photo.png images/`` prints ``path<TAB>label<TAB>probability`` for each image (a folder: its
PNG and JPEG files); ``--test test.npz`` prints the accuracy on a labelled .npz.

Only the safetensors file and the JSON card are read: no pickles, no code from the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from .data import image_to_array, resize_images
from .models import build_model
from .outputs import CARD_FORMAT

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class Preprocess:
    """Turns images into the normalised float tensor (N×C×H×W) the model expects, exactly as
    the training images were prepared: resized (bilinear, antialiased) to the card's input size,
    converted to the card's channels, scaled to 0-1 and normalised with the card's mean/std.

    Accepts a uint8 numpy batch (N×H×W or N×H×W×C), one PIL image or a sequence of PIL images.
    `classes` lists the class names, in the order of the model's outputs.
    """

    def __init__(self, card: dict, device: str | torch.device = "cpu"):
        spec = card["input"]
        self.height, self.width, self.channels = int(spec["height"]), int(spec["width"]), int(spec["channels"])
        self.classes: list[str] = list(card["classes"])
        self.device = torch.device(device)
        mean = torch.tensor(spec["mean"], dtype=torch.float32)
        std = torch.tensor(spec["std"], dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-mean / std).view(1, -1, 1, 1)

    def __call__(self, images) -> torch.Tensor:
        batch = self._as_uint8_batch(images)
        batch = resize_images(batch, self.height, self.width)
        x = torch.from_numpy(np.array(batch, dtype=np.uint8)).permute(0, 3, 1, 2).float()  # a copy: writable
        return (x * self.scale + self.shift).to(self.device)

    def _as_uint8_batch(self, images) -> np.ndarray:
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise TypeError(f"images must be uint8 (0-255), not {images.dtype}")
            if images.ndim == 3:
                images = images[:, :, :, None]
            if images.ndim != 4 or images.shape[3] not in (1, 3):
                raise ValueError(f"a numpy batch must be N×H×W or N×H×W×C (C = 1 or 3), not {images.shape}")
            return self._fix_channels(images)
        arrays = []
        for img in images:
            if not isinstance(img, Image.Image):
                raise TypeError("give a uint8 numpy batch, a PIL image or a sequence of PIL images")
            if self.channels == 1 and img.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
                img = img.convert("L")  # colour image for a grey model: standard luminance
            array = self._fix_channels(image_to_array(img)[None])
            arrays.append(resize_images(array, self.height, self.width)[0])
        return np.stack(arrays)

    def _fix_channels(self, batch: np.ndarray) -> np.ndarray:
        c = batch.shape[3]
        if c == self.channels:
            return batch
        if c == 1:
            return np.repeat(batch, self.channels, axis=3)
        # Colour batch for a grey model: ITU-R 601 luminance, as Pillow's convert("L").
        grey = batch.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(np.round(grey), 0, 255).astype(np.uint8)[:, :, :, None]


def read_card(card_path: str | Path) -> dict:
    """Read and check a model card written by this plugin."""
    card = json.loads(Path(card_path).read_text(encoding="utf-8"))
    if card.get("format") != CARD_FORMAT:
        raise ValueError(f"{card_path} is not an image-classifier model card (format "
                         f"{card.get('format')!r}, expected {CARD_FORMAT!r})")
    return card


def load_model(weights_path: str | Path, card_path: str | Path,
               device: str | torch.device = "cpu") -> tuple[nn.Module, Preprocess]:
    """Rebuild a trained classifier: (model in eval mode on `device`, its `Preprocess`).

    The network is built from the card's architecture spec and the weights are read from the
    safetensors file (strictly: every key must fit)."""
    card = read_card(card_path)
    model = build_model(card["architecture"])
    model.load_state_dict(load_file(str(weights_path), device="cpu"), strict=True)
    model.to(device).eval()
    return model, Preprocess(card, device=device)


@torch.no_grad()
def classify(model: nn.Module, preprocess: Preprocess, images, batch_size: int = 512) -> list[str]:
    """The predicted class name of each image."""
    x = preprocess(images)
    indices: list[int] = []
    for start in range(0, x.shape[0], batch_size):
        indices += model(x[start:start + batch_size]).argmax(1).tolist()
    return [preprocess.classes[i] for i in indices]


@torch.no_grad()
def predict(model: nn.Module, preprocess: Preprocess, images, batch_size: int = 512) -> list[tuple[str, float]]:
    """(class name, its softmax probability) of each image: the model's answer and how sure it is."""
    x = preprocess(images)
    answers: list[tuple[str, float]] = []
    for start in range(0, x.shape[0], batch_size):
        probabilities = torch.softmax(model(x[start:start + batch_size]).float(), dim=1)
        best, indices = probabilities.max(dim=1)
        answers += [(preprocess.classes[i], float(p)) for i, p in zip(indices.tolist(), best.tolist())]
    return answers


def image_files(paths: list[Path]) -> list[Path]:
    """The image files among `paths`: a file as given (whatever its name), a folder's PNG and
    JPEG files (by extension, in its subfolders too, in name order)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found


def accuracy(model: nn.Module, preprocess: Preprocess, images, labels, batch_size: int = 512) -> float:
    """The share of `images` classified as their `labels`: class names, or the integer labels
    of an .npz trained without names (whose class names are those integers as text)."""
    predicted = classify(model, preprocess, images, batch_size)
    return float(np.mean([p == str(label) for p, label in zip(predicted, labels, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    """``python -m dvm_image_classifier.predict model.safetensors model_card.json IMAGE|FOLDER...``:
    one line per image, ``path<TAB>label<TAB>probability`` (a folder: its PNG and JPEG files);
    ``--test test.npz``: the model's accuracy on a labelled .npz (``x``, ``y``; read without
    pickles), as one JSON line: ``{"samples": N, "accuracy": A}``. An image that cannot be read
    is named on stderr and the exit status is 1; the others are still classified."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m dvm_image_classifier.predict",
                                     description="Classify images with a trained image classifier, or measure "
                                                 "its accuracy on a labelled .npz")
    parser.add_argument("weights", type=Path, help="model.safetensors from the job's result")
    parser.add_argument("card", type=Path, help="model_card.json from the job's result")
    parser.add_argument("images", type=Path, nargs="*", help="image files (PNG, JPEG) or folders of them")
    parser.add_argument("--test", type=Path, help="an .npz with x (uint8 images) and y")
    args = parser.parse_args(argv)
    if not args.images and args.test is None:
        parser.error("give images or folders to classify, or --test with a labelled .npz")
    for path in args.images:
        if not path.exists():
            parser.error(f"{path}: no such file or folder")
    model, preprocess = load_model(args.weights, args.card)
    code = 0
    if args.images:
        files = image_files(args.images)
        if not files:
            print(f"no PNG or JPEG images in {', '.join(map(str, args.images))}", file=sys.stderr)
            code = 1
        for path in files:
            try:
                with Image.open(path) as img:
                    img.load()
                    (label, probability), = predict(model, preprocess, [img])
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                print(f"{path}: not an image this model can read ({exc})", file=sys.stderr)
                code = 1
                continue
            print(f"{path}\t{label}\t{probability:.4f}", flush=True)
    if args.test is not None:
        with np.load(args.test, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
            if "classes" in data.files:  # y indexes the names, as in a training .npz
                y = np.asarray(data["classes"]).astype(str)[y]
        print(json.dumps({"samples": int(len(y)), "accuracy": round(accuracy(model, preprocess, x, y), 6)}))
    return code


__all__ = ["load_model", "classify", "predict", "accuracy", "read_card", "image_files", "Preprocess"]


if __name__ == "__main__":
    raise SystemExit(main())
