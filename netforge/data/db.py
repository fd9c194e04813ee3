"""LMDB access as Caffe does it (util/db_lmdb.cpp): a directory holding data.mdb and lock.mdb,
records read in key order, a map that doubles when it is full, commits every 1000 puts.

Readers open read-only with ``lock=False`` and ``readahead=False`` (Caffe's MDB_RDONLY|MDB_NOTLS),
so several readers, in one process or many, can share a database. Only LMDB is supported;
a LevelDB source is refused with a message saying to convert it.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import lmdb
import numpy as np

from netforge.errors import ConfigError
from netforge.proto import pb

log = logging.getLogger("netforge")

DEFAULT_MAP_SIZE = 64 << 20  # 64 MiB to start; doubled whenever a commit finds the map full
COMMIT_EVERY = 1000

PathLike = str | os.PathLike[str]


def _key_bytes(key: bytes | str) -> bytes:
    return key.encode() if isinstance(key, str) else key


class LmdbWriter:
    """Writes records into a new (or existing) LMDB directory. Puts are batched and committed
    every ``commit_every`` puts and at ``close``; a full map is doubled and the commit retried."""

    def __init__(self, path: PathLike, map_size: int = DEFAULT_MAP_SIZE,
                 commit_every: int = COMMIT_EVERY):
        self.path = os.fspath(path)
        self.commit_every = max(1, int(commit_every))
        self.grow_count = 0
        self._pending: list[tuple[bytes, bytes]] = []
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"cannot create LMDB database {self.path}: a file is in the way")
        os.makedirs(self.path, mode=0o755, exist_ok=True)
        try:
            self._env: lmdb.Environment | None = lmdb.open(
                self.path, map_size=int(map_size), subdir=True, meminit=False)
        except lmdb.Error as e:
            raise ConfigError(f"cannot create LMDB database {self.path}: {e}") from None
        log.info("Opened lmdb %s", self.path)

    @property
    def map_size(self) -> int:
        return int(self._open_env().info()["map_size"])

    def put(self, key: bytes | str, value: bytes) -> None:
        self._pending.append((_key_bytes(key), value))
        if len(self._pending) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        """Write the pending puts in one transaction, doubling the map until they fit."""
        env = self._open_env()
        while self._pending:
            try:
                with env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
            except lmdb.MapFullError:
                self._grow(env)
                continue
            self._pending.clear()

    def _grow(self, env: lmdb.Environment) -> None:
        new_size = self.map_size * 2
        env.set_mapsize(new_size)
        self.grow_count += 1
        log.info("Doubling LMDB map size to %d MB", new_size >> 20)

    def _open_env(self) -> lmdb.Environment:
        if self._env is None:
            raise ValueError(f"LMDB writer for {self.path} is closed")
        return self._env

    def close(self) -> None:
        if self._env is None:
            return
        try:
            self.commit()
        finally:
            self._env.close()
            self._env = None

    def __enter__(self) -> LmdbWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        elif self._env is not None:  # do not commit half of a failed write
            self._pending.clear()
            self._env.close()
            self._env = None


def _looks_like_leveldb(path: Path) -> bool:
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return "CURRENT" in names or any(
        n.startswith("MANIFEST-") or n.endswith((".ldb", ".sst")) for n in names)


def check_lmdb_path(path: PathLike, backend: int | None = None) -> str:
    """``path`` as a string when it is an LMDB directory, else a ConfigError saying what it is.

    ``backend`` (a DataParameter.DB value) only shapes the message: an LMDB is opened whatever
    the config says, since Caffe's default backend is LEVELDB and many configs leave it unset.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        hint = None
        if backend == pb.DataParameter.LEVELDB:
            hint = "(data_param.backend is LEVELDB, the default; netforge reads only LMDB)"
        raise ConfigError(f"data source not found: {p}", hint=hint)
    if _looks_like_leveldb(p):
        raise ConfigError(f"LevelDB databases are not supported: {p}; convert it to LMDB "
                          "(re-run the converter with --backend=lmdb)")
    if not p.is_dir() or not (p / "data.mdb").is_file():
        raise ConfigError(f"not an LMDB database: {p} (expected a directory holding data.mdb)")
    return str(p)


# One read-only environment per database and process (LMDB forbids opening one twice in a
# process), shared by every reader of it (a train and a test net often read the same source).
_ENVS: dict[str, tuple[lmdb.Environment, int]] = {}
_ENVS_LOCK = threading.Lock()


def _acquire_env(path: str, key: str) -> lmdb.Environment:
    with _ENVS_LOCK:
        env, users = _ENVS.get(key, (None, 0))
        if env is None:
            try:
                env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=True,
                                max_readers=512)
            except lmdb.Error as e:
                raise ConfigError(f"not an LMDB database: {path} ({e})") from None
        _ENVS[key] = (env, users + 1)
        return env


def _release_env(key: str) -> None:
    with _ENVS_LOCK:
        env, users = _ENVS.pop(key, (None, 0))
        if env is None:
            return
        if users > 1:
            _ENVS[key] = (env, users - 1)
        else:
            env.close()


class LmdbReader:
    """A read-only LMDB: its length, its keys in order, random ``get`` and ordered iteration.
    Readers of one database share one environment; ``close`` (or garbage collection) releases
    this reader's share."""

    def __init__(self, path: PathLike, backend: int | None = None):
        self.path = check_lmdb_path(path, backend)
        # The key is fixed now: a relative path may mean another database when this reader
        # is released (after a chdir).
        self._key = os.path.realpath(self.path)
        self.env: lmdb.Environment = _acquire_env(self.path, self._key)
        self._release = weakref.finalize(self, _release_env, self._key)
        log.info("Opened lmdb %s", self.path)

    def __len__(self) -> int:
        return int(self.env.stat()["entries"])

    def keys(self) -> list[bytes]:
        with self.env.begin() as txn:
            return list(txn.cursor().iternext(keys=True, values=False))

    def get(self, key: bytes | str) -> bytes | None:
        with self.env.begin() as txn:
            value = txn.get(_key_bytes(key))
        return None if value is None else bytes(value)

    def items(self, start: int = 0) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs in key order, from record index ``start`` to the end."""
        n = len(self)
        if n == 0:
            return
        cursor = self.cursor(start)
        try:
            for _ in range(n - cursor.index):
                yield cursor.key, cursor.value
                cursor.next()
        finally:
            cursor.close()

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return self.items()

    def cursor(self, start: int = 0) -> RecordCursor:
        return RecordCursor(self.env, start)

    def shuffled_cursor(self, seed: int, start: int = 0) -> ShuffledCursor:
        return ShuffledCursor(self.env, seed, start)

    def close(self) -> None:
        self._release()

    def __enter__(self) -> LmdbReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RecordCursor:
    """A position in an LMDB that walks the records in key order and wraps to the first record
    at the end (Caffe's ``SeekToFirst``); ``index`` counts records from the first key."""

    def __init__(self, env: lmdb.Environment, start: int = 0):
        self._txn = env.begin(buffers=False)
        self._cur = self._txn.cursor()
        self.length = int(self._txn.stat()["entries"])
        self.index = 0
        if self.length == 0:
            raise ConfigError(f"LMDB database is empty: {env.path()}")
        self._cur.first()
        self.seek(start)

    def seek(self, index: int) -> None:
        """Move to record ``index`` (taken modulo the number of records)."""
        index %= self.length
        if index < self.index:
            self._cur.first()
            self.index = 0
        for _ in range(index - self.index):
            self._cur.next()
        self.index = index

    @property
    def key(self) -> bytes:
        return self._cur.key()

    @property
    def value(self) -> bytes:
        return self._cur.value()

    def next(self) -> bool:
        """Advance one record; False when that passed the end and the cursor went back to the
        first record."""
        self.index += 1
        if self._cur.next():
            return True
        self._cur.first()
        self.index = 0
        return False

    def close(self) -> None:
        self._txn.abort()


class ShuffledCursor:
    """Like RecordCursor, but each epoch visits the records in a new random order: epoch e
    uses the permutation drawn from ``seed`` and e, so any position can be sought again.
    ``index`` counts records from the start of epoch 0 (epoch · length + position)."""

    def __init__(self, env: lmdb.Environment, seed: int, start: int = 0):
        self._txn = env.begin(buffers=False)
        with self._txn.cursor() as cur:
            self._keys = list(cur.iternext(keys=True, values=False))
        self.length = len(self._keys)
        if self.length == 0:
            raise ConfigError(f"LMDB database is empty: {env.path()}")
        self._seed = int(seed)
        self._epoch = -1
        self.seek(start)

    def _order(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self._seed, epoch]).permutation(self.length)
            self._epoch = epoch

    def seek(self, index: int) -> None:
        self.index = max(0, int(index))
        self._order(self.index // self.length)

    @property
    def key(self) -> bytes:
        return self._keys[int(self._perm[self.index % self.length])]

    @property
    def value(self) -> bytes:
        value = self._txn.get(self.key)
        assert value is not None
        return value

    def next(self) -> bool:
        """Advance one record; False when that started a new epoch (a new order)."""
        self.index += 1
        self._order(self.index // self.length)
        return self.index % self.length != 0

    def close(self) -> None:
        self._txn.abort()
