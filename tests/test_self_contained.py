"""The checkout is all there is: a user's clone has nothing beside it.

Our own machines keep notes and test vectors in a folder next to the checkout; nothing tracked may
point there, or `make test` passes for us and fails for everyone else.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Spelt in two parts so that this file does not find itself.
OUTSIDE = ("../" + "shared", "..\\" + "shared")


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_refers_to_the_folder_beside_the_checkout() -> None:
    offenders = []
    for path in _tracked_files():
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", "replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(word in line for word in OUTSIDE):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:120]}")
    assert not offenders, "tracked files refer outside the checkout:\n" + "\n".join(offenders)


def test_the_nip44_vectors_travel_with_the_project() -> None:
    assert (ROOT / "tests" / "vectors" / "nip44.vectors.json").is_file()
    assert "tests/vectors/nip44.vectors.json" in {
        str(p.relative_to(ROOT)) for p in _tracked_files()
    }
