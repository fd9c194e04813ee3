"""Snapshot files: weights (.npz by layer name and blob index) and solver state (.npz).

Both are written atomically: to a temporary file in the same folder, flushed and fsynced,
then renamed over the target, so a crash never leaves a half-written snapshot. Nothing is
pickled (``allow_pickle=False`` on read); structured state travels as a JSON string.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from netforge.errors import ConfigError

SEP = "/"
STATE_FORMAT = "netforge-solverstate-1"


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _read_npz(path: str | os.PathLike[str], what: str) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} file not found", str(path))
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ConfigError(f"cannot read {what} file: {e}", str(path)) from None


def write_weights(path: str | os.PathLike[str],
                  weights: Mapping[str, Sequence[np.ndarray]]) -> None:
    """Weights keyed '<layer>/<index>' (layer names may contain '/'; the index never does)."""
    arrays = {f"{name}{SEP}{k}": np.asarray(a) for name, blobs in weights.items()
              for k, a in enumerate(blobs)}
    atomic_write_bytes(path, _npz_bytes(arrays))


def read_weights(path: str | os.PathLike[str]) -> dict[str, list[np.ndarray]]:
    """Layer name -> parameter arrays in index order, in the order the layers were saved."""
    raw = _read_npz(path, "weights")
    grouped: dict[str, dict[int, np.ndarray]] = {}
    for key, value in raw.items():
        name, sep, idx = key.rpartition(SEP)
        if not sep or not idx.isdigit():
            raise ConfigError(f"not a netforge weights file (unexpected entry '{key}')", str(path))
        grouped.setdefault(name, {})[int(idx)] = value
    out = {}
    for name, blobs in grouped.items():
        if sorted(blobs) != list(range(len(blobs))):
            raise ConfigError(f"weights for layer '{name}' are missing an index", str(path))
        out[name] = [blobs[k] for k in range(len(blobs))]
    return out


def write_state(path: str | os.PathLike[str], meta: Mapping[str, Any],
                history: Sequence[np.ndarray]) -> None:
    """Solver state: JSON metadata (iter, learned_net, current_step, RNG and data cursors)
    plus the history arrays in learnable-param order."""
    arrays = {"meta": np.frombuffer(json.dumps({"format": STATE_FORMAT, **meta}).encode(),
                                    dtype=np.uint8)}
    for k, h in enumerate(history):
        arrays[f"history{SEP}{k}"] = np.asarray(h)
    atomic_write_bytes(path, _npz_bytes(arrays))


def read_state(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[np.ndarray]]:
    raw = _read_npz(path, "solver state")
    if "meta" not in raw:
        raise ConfigError("not a netforge solver-state file (a weights file? resume takes the "
                          "*.solverstate.npz written beside it)", str(path))
    meta = json.loads(raw["meta"].tobytes().decode())
    if meta.get("format") != STATE_FORMAT:
        raise ConfigError(f"unsupported solver-state format {meta.get('format')!r}", str(path))
    n = sum(1 for k in raw if k.startswith(f"history{SEP}"))
    history = [raw[f"history{SEP}{k}"] for k in range(n)]
    return meta, history
