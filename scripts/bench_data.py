"""Throughput of the Data layer: LMDB records -> transformed float batches, in images/s.

    python scripts/bench_data.py DB [--batch 64] [--batches 2000] [--scale 0.00390625]
    python scripts/bench_data.py /tmp/mnist/mnist_train_lmdb --mnist-dir /work/shared/data/mnist

With --mnist-dir, DB is first created from the IDX files there when it does not exist. Two
numbers are printed: the batch reader alone (decode + transform in this thread) and the Data
layer's forward with prefetching (what a training loop sees). The target is >= 50,000 images/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from google.protobuf import text_format

from netforge.backend import NumpyBackend
from netforge.blob import Blob
from netforge.data.mnist import convert_mnist
from netforge.layers import REGISTRY, LayerContext
from netforge.layers.base import PHASE_TRAIN
from netforge.proto import pb


def make_layer(db: str, batch: int, scale: float, prefetch: int):
    p = pb.LayerParameter()
    text_format.Parse(f'name: "data" type: "Data" top: "data" top: "label" '
                      f'data_param {{ source: "{db}" batch_size: {batch} backend: LMDB '
                      f'prefetch: {prefetch} }} transform_param {{ scale: {scale} }}', p)
    backend = NumpyBackend("float32")
    ctx = LayerContext(backend=backend, phase=PHASE_TRAIN, rng=np.random.default_rng(0))
    layer = REGISTRY["Data"](p, ctx)
    top = [Blob(backend), Blob(backend)]
    layer.setup([], top)
    layer.reshape([], top)
    return layer, top


def bench_reader(layer, batches: int) -> float:
    """Images/s of decode + transform alone, in this thread."""
    cursor = layer.reader.cursor(0)
    reader = layer._batches  # the layer's batch reader, timed without the thread
    start = time.perf_counter()
    for _ in range(batches):
        reader.read(cursor)
    elapsed = time.perf_counter() - start
    cursor.close()
    return batches * layer.batch_size / elapsed


def bench_forward(layer, top, batches: int) -> float:
    """Images/s seen by a loop that does nothing but call forward."""
    layer.forward([], top)  # start the prefetch thread
    start = time.perf_counter()
    for _ in range(batches):
        layer.forward([], top)
    elapsed = time.perf_counter() - start
    return batches * layer.batch_size / elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", help="an LMDB of Datums (e.g. mnist_train_lmdb)")
    ap.add_argument("--mnist-dir", help="create DB from the MNIST train IDX files here first")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--scale", type=float, default=0.00390625)
    ap.add_argument("--prefetch", type=int, default=4)
    args = ap.parse_args(argv)
    if args.mnist_dir and not os.path.exists(args.db):
        src = args.mnist_dir
        n = convert_mnist(os.path.join(src, "train-images-idx3-ubyte.gz"),
                          os.path.join(src, "train-labels-idx1-ubyte.gz"), args.db)
        print(f"converted {n} images into {args.db}")
    layer, top = make_layer(args.db, args.batch, args.scale, args.prefetch)
    print(f"{args.db}: {len(layer.reader)} records, batch {args.batch}, "
          f"output {top[0].shape}")
    print(f"batch reader (decode + transform): {bench_reader(layer, args.batches):,.0f} images/s")
    print(f"Data layer forward (prefetching):  "
          f"{bench_forward(layer, top, args.batches):,.0f} images/s")
    layer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
