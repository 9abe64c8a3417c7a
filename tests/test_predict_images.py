"""`python -m dvm_image_classifier.predict` on image files, as a customer runs it on a result: one
PNG or JPEG, a folder of them (subfolders too), any size or colour (resized and converted as the
training images were); one line per image, ``path<TAB>label<TAB>probability``; a file that is
not an image is named and the others still classified. The labelled-.npz mode still works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from PIL import Image  # noqa: E402

from .test_image_classifier import DATA_URL, Job, save_npz  # noqa: E402

from dvm_image_classifier.digits import CLASSES, digits_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def predict(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'plugins'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dvm_image_classifier.predict", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    x, y, x_test, y_test = digits_split()
    train = save_npz(tmp / "digits_train.npz", x=x, y=y, classes=np.array(CLASSES))
    result = Job(tmp, {DATA_URL: train}, {"epochs": 3}).run()
    files = {a.name: a.path for a in result.artifacts}
    return {"weights": files["model.safetensors"], "card": files["model_card.json"], "x_test": x_test,
            "y_test": y_test, "dir": tmp}


def test_predict_classifies_image_files_and_folders(model, tmp_path):
    from dvm_image_classifier.predict import load_model, predict as predict_arrays

    x_test, y_test = model["x_test"][:40], model["y_test"][:40]
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    expected: dict[str, int] = {}
    for i, (image, label) in enumerate(zip(x_test, y_test)):
        if i % 4 == 0:     # JPEG, enlarged to 32×32 and in colour: resized and made grey like the training images
            path = folder / "more" / f"{i:02d}.JPG"
            Image.fromarray(image).resize((32, 32), Image.NEAREST).convert("RGB").save(path, quality=95)
        else:
            path = folder / f"{i:02d}.png"
            Image.fromarray(image).save(path)
        expected[str(path)] = int(label)
    (folder / "notes.txt").write_text("not an image, and not named like one: skipped")
    single = tmp_path / "one.png"
    Image.fromarray(model["x_test"][50]).save(single)

    run = predict(model["weights"], model["card"], folder, single, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line.split("\t") for line in run.stdout.splitlines()]
    assert all(len(parts) == 3 for parts in lines), run.stdout
    assert [p for p, _, _ in lines] == sorted(expected) + [str(single)]   # a folder's images in name order
    assert all(label in CLASSES and 0.1 <= float(prob) <= 1.0 for _, label, prob in lines)
    labels = {p: int(label) for p, label, _ in lines}
    correct = sum(labels[p] == want for p, want in expected.items())
    assert correct >= 0.85 * len(expected), (correct, len(expected))
    # The PNGs (8×8 grey, as trained) get exactly what the Python API gives for the arrays.
    net, preprocess = load_model(model["weights"], model["card"])
    pngs = [(p, int(Path(p).stem)) for p in expected if p.endswith(".png")]
    api = predict_arrays(net, preprocess, np.stack([x_test[i] for _, i in pngs]))
    for (path, _), (label, probability) in zip(pngs, api):
        assert labels[path] == int(label) and float(dict((p, q) for p, _, q in lines)[path]) == \
            pytest.approx(probability, abs=1e-4)


def test_predict_names_a_broken_image_and_classifies_the_rest(model, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(model["x_test"][0]).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    run = predict(model["weights"], model["card"], broken, good, cwd=tmp_path)
    assert run.returncode == 1
    assert "broken.png: not an image this model can read" in run.stderr
    assert run.stdout.startswith(f"{good}\t") and len(run.stdout.splitlines()) == 1
    missing = predict(model["weights"], model["card"], tmp_path / "nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "nowhere: no such file or folder" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = predict(model["weights"], model["card"], empty, cwd=tmp_path)
    assert nothing.returncode == 1 and "no PNG or JPEG images" in nothing.stderr
    neither = predict(model["weights"], model["card"], cwd=tmp_path)
    assert neither.returncode == 2 and "give images or folders" in neither.stderr


def test_predict_still_measures_accuracy_on_a_labelled_npz(model, tmp_path):
    test = save_npz(tmp_path / "test.npz", x=model["x_test"], y=model["y_test"], classes=np.array(CLASSES))
    run = predict(model["weights"], model["card"], "--test", test, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["samples"] == 359 and report["accuracy"] >= 0.85
