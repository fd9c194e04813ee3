"""Fixtures shared by the net, solver and CLI tests."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from netforge.data.mnist import write_image_db

ROOT = Path(__file__).resolve().parent.parent


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1, 28, 28) uint8 images whose class (0-9) is where a bright 8×8 square sits, plus
    noise: easy to learn, so a few LeNet iterations show the loss falling."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 60, size=(n, 1, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 5)
        images[i, 0, 2 + 12 * r:10 + 12 * r, 1 + 5 * c:9 + 5 * c] = 230
    return images, labels


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project-like folder (models/, solvers/ from the repo, a small synthetic
    data/mnist/*_lmdb) that is the working directory, as a user's checkout would be."""
    for sub in ("models", "solvers"):
        shutil.copytree(ROOT / sub, tmp_path / sub)
    for name, n, seed in (("mnist_train_lmdb", 256, 1), ("mnist_test_lmdb", 200, 2)):
        images, labels = synthetic_digits(n, seed)
        write_image_db(images, labels, tmp_path / "data" / "mnist" / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _quiet_netforge_logger() -> None:
    """Let caplog see netforge's records even after a CLI run configured its handlers."""
    logger = logging.getLogger("netforge")
    for h in list(logger.handlers):
        if getattr(h, "_netforge", False):
            logger.removeHandler(h)
            h.close()
    logger.propagate = True
