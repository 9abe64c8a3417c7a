"""Reading a customer's dataset safely into memory: an .npz file or an archive of class folders.

Two formats:

- **.npz** (``numpy.savez``/``savez_compressed``): ``x``, uint8 images N×H×W (grey) or N×H×W×C
  (C = 1 or 3); ``y``, N integer labels; optionally ``classes``, the class names as strings
  (then ``y`` indexes them). Loaded with ``np.load(allow_pickle=False)`` only, after each
  array's header was read and checked (dtype, shape, declared size) without touching its data.
- **a zip or tar of class folders**: ``<class>/<image>.png|jpg``, optionally inside one top
  folder; unpacked by `dvm_core.archives.extract_archive` (paths, links, bombs, limits), each
  image decoded by Pillow (PNG and JPEG only). Zip junk (``__MACOSX/``, hidden files such as
  ``.DS_Store``, ``Thumbs.db``) is skipped; any other file that is not an image is refused,
  by name.

Everything a customer can get wrong is a `JobInputError` whose message names the problem (and
the file): a corrupt or truncated file, a bomb, labels that do not match the images, a single
class, an empty set, images of different sizes (unless ``image_size`` resizes them).
`max_dataset_bytes` bounds the file, its unpacked contents and the decoded images alike.
"""

from __future__ import annotations

import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.nn import functional as F

from dvm_core import JobInputError
from dvm_core.datarefs import sha256_file
from dvm_core.archives import NUMPY_HEADER_LOCK, ArchiveError, archive_format, extract_archive

from .params import MIN_IMAGE_SIZE, Limits

MAX_RATIO = 200.0            # the most an .npz member may expand (as the archive extractor)
RATIO_MIN_BYTES = 1 << 20    # below this, small members compress as they like
MAX_IMAGE_PIXELS = 1 << 24   # one decoded image, before resizing (a 4096×4096 photo)
MAX_CLASSES = 10_000
JUNK_NAMES = {"thumbs.db", "desktop.ini"}
IMAGE_FORMATS = ("PNG", "JPEG")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class LabelledImages:
    """Images with their labels, as read from one input, before classes are assigned.

    `codes[i]` is sample i's label as found in the file (an integer for .npz, a folder index
    for class folders) and `names[code]` its class name. `fixed` is true when the file named
    its classes in order (an .npz ``classes`` array): then that order is kept, even for classes
    without a sample, so the network's outputs match the customer's label numbers.
    """

    images: np.ndarray          # uint8, N×H×W×C
    codes: np.ndarray           # int64, N
    names: dict[int, str]
    fixed: bool
    sha256: str
    format: str                 # "npz" or "folders"


@dataclass
class Dataset:
    """A training or validation set ready for training: labels index `classes`."""

    images: np.ndarray          # uint8, N×H×W×C
    labels: np.ndarray          # int64, N
    classes: list[str]
    sha256: str
    format: str
    fixed: bool = False         # the classes came from an .npz 'classes' array


def resize_images(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 images (N×H×W×C) to height×width: bilinear with antialiasing, in chunks.

    Training data and `predict` both go through this one routine, so a customer's images are
    preprocessed exactly as the training images were."""
    n, h, w, c = images.shape
    if (h, w) == (height, width):
        return images
    out = np.empty((n, height, width, c), dtype=np.uint8)
    chunk = max(1, (64 << 20) // (4 * max(h * w, height * width) * c))  # ~64 MB of floats at a time
    for start in range(0, n, chunk):
        part = np.ascontiguousarray(images[start:start + chunk])
        if not part.flags.writeable:  # torch wants writable memory (np.asarray of a PIL image is not)
            part = part.copy()
        batch = torch.from_numpy(part).permute(0, 3, 1, 2).float()
        resized = F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True,
                                align_corners=False)
        out[start:start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def image_to_array(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image as uint8 H×W×1 (grey) or H×W×3 (colour; alpha dropped)."""
    mode = img.mode
    if mode in ("1", "L", "LA"):
        return np.asarray(img.convert("L"), dtype=np.uint8)[:, :, None]
    if mode in _GREY_MODES:
        # Deeper greys (16-bit PNGs open as "I;16" or "I"): scale 0-65535 to 0-255, where
        # convert("L") would clip. Values that fit in 0-255 are taken as they are.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or float(arr.max(initial=0)) > 255 else 255.0
        return np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)[:, :, None]
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_labelled(path: Path, *, what: str, limits: Limits, workdir: Path, image_size: int | None,
                  check_cancelled: Callable[[], None]) -> LabelledImages:
    """Read one dataset input (`what` names it in messages: "training set", "validation set").

    Raises JobInputError for anything wrong with the file; `check_cancelled` is called now and
    then and may raise to stop."""
    size = path.stat().st_size
    if size > limits.max_dataset_bytes:
        raise JobInputError(f"the {what} is {size} bytes; this provider takes at most "
                            f"{limits.max_dataset_bytes}")
    if size == 0:
        raise JobInputError(f"the {what} is an empty file")
    digest = sha256_file(path)
    if _is_npz(path):
        images, codes, names, fixed = _load_npz(path, what, limits)
        if image_size is not None:
            images = resize_images(images, image_size, image_size)
        fmt = "npz"
    else:
        images, codes, names = _load_folders(path, what, limits, workdir, image_size, check_cancelled)
        fixed = False
        fmt = "folders"
    _check_image_dims(images, what, limits, image_size)
    return LabelledImages(images=images, codes=codes, names=names, fixed=fixed, sha256=digest, format=fmt)


def _check_image_dims(images: np.ndarray, what: str, limits: Limits, image_size: int | None) -> None:
    h, w = images.shape[1:3]
    if image_size is None and max(h, w) > limits.max_image_size:
        raise JobInputError(f"the {what}'s images are {h}×{w} pixels; this provider trains at most "
                            f"{limits.max_image_size} px: set param image_size to shrink them")
    if min(h, w) < MIN_IMAGE_SIZE:
        raise JobInputError(f"the {what}'s images are {h}×{w} pixels; they need at least "
                            f"{MIN_IMAGE_SIZE} px a side (or set param image_size)")


# --- .npz ------------------------------------------------------------------------------------

def _is_npz(path: Path) -> bool:
    """An .npz is a zip holding x.npy and y.npy; any other zip is an archive of class folders."""
    if archive_format(path) != "zip":
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False  # let the archive extractor give its precise error
    # A zip of .npy arrays is an .npz, whatever its arrays are called (then: a clear error).
    return "x.npy" in names or "y.npy" in names or bool(names) and all(n.endswith(".npy") for n in names)


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> tuple[tuple[int, ...], np.dtype]:
    """Read and check one .npy member's header (shape, dtype) without reading its data."""
    name = info.filename
    with zf.open(info) as f, NUMPY_HEADER_LOCK:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject or dtype.fields is not None:
        raise JobInputError(f"array {name[:-4]!r} in the {what} holds Python objects or records; "
                            "send plain numeric arrays (they are never unpickled)")
    declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    if declared > info.file_size:
        raise JobInputError(f"the {what} is a corrupt or truncated .npz file: {name} declares "
                            f"{declared} bytes of data but holds {info.file_size}")
    return tuple(int(d) for d in shape), dtype


def _load_npz(path: Path, what: str, limits: Limits):
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            for required, meaning in (("x", "the images"), ("y", "the labels")):
                if f"{required}.npy" not in infos:
                    held = ", ".join(sorted(n[:-4] for n in infos if n.endswith(".npy"))) or "none"
                    raise JobInputError(f"the {what} .npz has no array {required!r} ({meaning}); it "
                                        f"holds: {held}. Save it as np.savez(path, x=images, y=labels)")
            total = 0
            headers = {}
            for key in ("x", "y", "classes"):
                info = infos.get(f"{key}.npy")
                if info is None:
                    continue
                total += info.file_size
                if total > limits.max_dataset_bytes:
                    raise JobInputError(f"the {what} holds more than {limits.max_dataset_bytes} bytes "
                                        "uncompressed; this provider takes no more")
                if info.file_size > RATIO_MIN_BYTES and info.file_size / max(1, info.compress_size) > MAX_RATIO:
                    raise JobInputError(f"array {key!r} in the {what} expands "
                                        f"{info.file_size / max(1, info.compress_size):.0f} times "
                                        f"(more than {MAX_RATIO:g}): refused as a decompression bomb")
                headers[key] = _npy_header(zf, info, what)
        _check_npz_headers(headers, what)
        # The headers are sound and the sizes bounded: now let numpy read the data, never pickles
        # (under the lock: numpy parses each header again; the sizes are bounded, so a load
        # holds it for at most the seconds max_dataset_bytes takes to read).
        with NUMPY_HEADER_LOCK, np.load(path, allow_pickle=False) as npz:
            x = npz["x"]
            y = npz["y"]
            classes = npz["classes"] if "classes" in headers else None
    except JobInputError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError) as exc:
        raise JobInputError(f"the {what} is a corrupt or truncated .npz file ({exc})") from None
    if x.ndim == 3:
        x = x[:, :, :, None]
    x = np.ascontiguousarray(x)
    y = y.reshape(-1).astype(np.int64)
    if classes is None:
        names = {int(v): str(int(v)) for v in np.unique(y)}
        return x, y, names, False
    names_list = [str(c) for c in classes.reshape(-1)]
    if len(set(names_list)) != len(names_list):
        raise JobInputError(f"the class names in the {what}'s 'classes' array are not unique")
    if y.size and (y.min() < 0 or y.max() >= len(names_list)):
        raise JobInputError(f"the {what}'s labels y must index its 'classes' array "
                            f"(0-{len(names_list) - 1}); found {int(y.min())}..{int(y.max())}")
    return x, y, dict(enumerate(names_list)), True


def _check_npz_headers(headers: dict, what: str) -> None:
    x_shape, x_dtype = headers["x"]
    y_shape, y_dtype = headers["y"]
    if x_dtype != np.uint8:
        raise JobInputError(f"x in the {what} must be uint8 (0-255), not {x_dtype}: e.g. "
                            "(x * 255).round().astype(np.uint8) for images scaled to 0-1")
    if len(x_shape) not in (3, 4) or (len(x_shape) == 4 and x_shape[3] not in (1, 3)):
        raise JobInputError(f"x in the {what} must be N×H×W (grey) or N×H×W×C with C = 1 or 3; "
                            f"its shape is {x_shape}")
    if x_shape[0] == 0:
        raise JobInputError(f"the {what} is empty (x holds no images)")
    if y_dtype.kind not in "iu":
        raise JobInputError(f"y in the {what} must hold integer labels, not {y_dtype}")
    if len(y_shape) not in (1, 2) or (len(y_shape) == 2 and y_shape[1] != 1):
        raise JobInputError(f"y in the {what} must be one label per image (shape N); its shape is {y_shape}")
    if y_shape[0] != x_shape[0]:
        raise JobInputError(f"the labels do not match the images in the {what}: x holds "
                            f"{x_shape[0]} images but y holds {y_shape[0]} labels")
    if "classes" in headers:
        c_shape, c_dtype = headers["classes"]
        if c_dtype.kind not in "U" or len(c_shape) != 1 or not 2 <= c_shape[0] <= MAX_CLASSES:
            raise JobInputError(f"'classes' in the {what} must be a list of 2-{MAX_CLASSES} class "
                                f"names (strings); it is {c_dtype} of shape {c_shape}")


# --- class folders ---------------------------------------------------------------------------

def _is_junk(parts: tuple[str, ...]) -> bool:
    """Files that zip tools add on their own: skipped rather than refused."""
    return any(p == "__MACOSX" or p.startswith(".") for p in parts) or parts[-1].lower() in JUNK_NAMES


def _class_files(files: list[Path], root: Path, what: str) -> list[tuple[str, PurePosixPath, Path]]:
    """(class name, relative path, path) for each image file, in a stable order."""
    rel = [(PurePosixPath(f.relative_to(root).as_posix()), f) for f in files]
    rel = [(r, f) for r, f in rel if not _is_junk(r.parts)]
    # A single top folder holding the class folders ("digits/0/a.png") is stripped.
    while rel and all(len(r.parts) >= 3 for r, _ in rel) and len({r.parts[0] for r, _ in rel}) == 1:
        rel = [(PurePosixPath(*r.parts[1:]), f) for r, f in rel]
    out = []
    for r, f in sorted(rel, key=lambda item: item[0].as_posix()):
        if len(r.parts) < 2:
            raise JobInputError(f"file {r.as_posix()!r} in the {what} is not inside a class folder: "
                                "put each class's images in a folder named after the class")
        out.append((r.parts[0], r, f))
    return out


def _load_folders(path: Path, what: str, limits: Limits, workdir: Path, image_size: int | None,
                  check_cancelled: Callable[[], None]):
    if archive_format(path) is None:
        raise JobInputError(f"the {what} is neither an .npz file (arrays x and y) nor a zip or tar "
                            "archive of class folders")
    target = workdir / ("unpacked-" + what.replace(" ", "-"))
    if target.exists():  # left by an earlier attempt of this job (a restart): start clean
        shutil.rmtree(target)
    try:
        files = extract_archive(path, target, max_total_bytes=limits.max_dataset_bytes,
                                max_files=2 * limits.max_samples + 1000,  # images and their folders
                                check_cancelled=check_cancelled)
    except ArchiveError as exc:
        raise JobInputError(f"the {what} archive cannot be used: {exc}") from None
    entries = _class_files(files, target, what)
    if not entries:
        raise JobInputError(f"the {what} holds no images: send a zip or tar with one folder per class "
                            "holding its PNG or JPEG images")
    if len(entries) > limits.max_samples:
        raise JobInputError(f"the {what} holds {len(entries)} files; this provider trains on at most "
                            f"{limits.max_samples} images per job")
    class_names = sorted({cls for cls, _, _ in entries}, key=natural_key)
    if len(class_names) > MAX_CLASSES:
        raise JobInputError(f"the {what} has {len(class_names)} class folders; at most {MAX_CLASSES}")
    code_of = {name: i for i, name in enumerate(class_names)}
    arrays: list[np.ndarray] = []
    codes = np.empty(len(entries), dtype=np.int64)
    first_shape: tuple[tuple[int, int], str] | None = None
    decoded_bytes = 0
    for i, (cls, rel, file) in enumerate(entries):
        if i % 256 == 0:
            check_cancelled()
        arr = _decode(file, rel.as_posix(), what)
        if image_size is not None:
            arr = resize_images(arr[None], image_size, image_size)[0]
        elif first_shape is None:
            first_shape = (arr.shape[:2], rel.as_posix())
        elif arr.shape[:2] != first_shape[0]:
            (h0, w0), name0 = first_shape
            raise JobInputError(f"the {what}'s images have different sizes: {name0!r} is {h0}×{w0} but "
                                f"{rel.as_posix()!r} is {arr.shape[0]}×{arr.shape[1]}; send images of "
                                "one size or set param image_size to resize them all")
        decoded_bytes += arr.shape[0] * arr.shape[1] * 3  # count as colour: greys may be promoted
        if decoded_bytes > limits.max_dataset_bytes:
            raise JobInputError(f"the {what}'s images take more than {limits.max_dataset_bytes} bytes "
                                "decoded; this provider takes no more (set a smaller image_size)")
        arrays.append(arr)
        codes[i] = code_of[cls]
    # Mixed grey and colour images: train in colour, the greys repeated on the three channels.
    channels = 3 if any(a.shape[2] == 3 for a in arrays) else 1
    if channels == 3:
        arrays = [a if a.shape[2] == 3 else np.repeat(a, 3, axis=2) for a in arrays]
    images = np.stack(arrays)
    return images, codes, dict(enumerate(class_names))


def _decode(file: Path, name: str, what: str) -> np.ndarray:
    try:
        with Image.open(file, formats=IMAGE_FORMATS) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise JobInputError(f"image {name!r} in the {what} is {width}×{height} pixels; "
                                    f"at most {MAX_IMAGE_PIXELS} pixels per image")
            img.load()
            return image_to_array(img)
    except JobInputError:
        raise
    except UnidentifiedImageError:
        raise JobInputError(f"file {name!r} in the {what} is not a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise JobInputError(f"image {name!r} in the {what} cannot be decoded (corrupt or truncated?): "
                            f"{exc}") from None


def natural_key(name: str):
    """Sort class names numerically when they are numbers ("2" before "10"), else as text."""
    return (0, int(name), "") if name.isascii() and name.isdigit() else (1, 0, name)


# --- classes ---------------------------------------------------------------------------------

def as_training_set(raw: LabelledImages, what: str = "training set") -> Dataset:
    """Assign the classes from the training set itself; at least two must have images."""
    present = np.unique(raw.codes)
    if raw.fixed:
        classes = [raw.names[i] for i in range(len(raw.names))]
        labels = raw.codes
    else:
        # Codes are label values (.npz) or folder indices in natural order: sorted, both read well.
        classes = [raw.names[int(c)] for c in present]
        labels = np.searchsorted(present, raw.codes).astype(np.int64)
    if len(present) < 2:
        only = raw.names[int(present[0])] if len(present) else "none"
        raise JobInputError(f"the {what} has only one class ({only!r}): a classifier needs images of "
                            "at least two classes")
    if len(classes) > MAX_CLASSES:
        raise JobInputError(f"the {what} has {len(classes)} classes; at most {MAX_CLASSES}")
    return Dataset(images=raw.images, labels=labels, classes=classes, sha256=raw.sha256, format=raw.format,
                   fixed=raw.fixed)


def as_validation_set(raw: LabelledImages, train: Dataset) -> Dataset:
    """Label a validation set with the training set's classes, checking its images fit."""
    index = {name: i for i, name in enumerate(train.classes)}
    names = raw.names
    if train.fixed and raw.format == "npz" and not raw.fixed:
        # The training set named its classes and y indexes them: so does this y.
        if raw.codes.size and (raw.codes.min() < 0 or raw.codes.max() >= len(train.classes)):
            raise JobInputError(f"the validation labels must index the training set's 'classes' "
                                f"(0-{len(train.classes) - 1}); found {int(raw.codes.min())}.."
                                f"{int(raw.codes.max())}")
        names = dict(enumerate(train.classes))
    codes, inverse = np.unique(raw.codes, return_inverse=True)
    targets = np.empty(len(codes), dtype=np.int64)
    for i, code in enumerate(codes):
        name = names[int(code)]
        if name not in index:
            raise JobInputError(f"the validation set has class {name!r}, which the training set has "
                                f"not (training classes: {', '.join(train.classes[:20])}"
                                f"{', …' if len(train.classes) > 20 else ''})")
        targets[i] = index[name]
    labels = targets[inverse.reshape(-1)]
    images = raw.images
    if images.shape[1:3] != train.images.shape[1:3]:
        raise JobInputError(f"the validation images are {images.shape[1]}×{images.shape[2]} but the training "
                            f"images {train.images.shape[1]}×{train.images.shape[2]}: send one size or set "
                            "param image_size to resize both")
    if images.shape[3] != train.images.shape[3]:
        if train.images.shape[3] == 3 and images.shape[3] == 1:
            images = np.repeat(images, 3, axis=3)
        else:
            raise JobInputError("the validation images are in colour but the training images are grey")
    return Dataset(images=images, labels=labels, classes=train.classes, sha256=raw.sha256, format=raw.format)
