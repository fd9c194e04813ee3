"""netforge's data_param.shuffle: every epoch reads each record once, in a new order that
the net's seed fixes, and a resumed layer continues the same sequence."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers import PHASE_TRAIN, make_layer, tops
from tests.test_data import counting_db, run_batches

GRAD_CHECKED: set[str] = set()
NO_BACKWARD: set[str] = set()


def shuffled_layer(db: str, batch: int, seed: int = 1701, shuffle: bool = True):
    layer = make_layer("Data", f'data_param {{ source: "{db}" batch_size: {batch} '
                               f'backend: LMDB prefetch: 2 shuffle: {str(shuffle).lower()} }}',
                       phase=PHASE_TRAIN, dtype="float32", seed=seed)
    top = tops(2, "float32")
    layer.setup([], top)
    layer.reshape([], top)
    return layer, top


def labels(layer, top, n: int) -> list[int]:
    return [int(v) for _, lab in run_batches(layer, top, n) for v in lab]


def test_each_epoch_is_a_new_permutation(tmp_path: Path) -> None:
    db = counting_db(tmp_path, n=12)
    layer, top = shuffled_layer(db, 4)
    seen = labels(layer, top, 9)  # three epochs of 12
    epochs = [seen[i:i + 12] for i in (0, 12, 24)]
    for e in epochs:
        assert sorted(e) == list(range(12))
    assert epochs[0] != list(range(12)) and epochs[0] != epochs[1] != epochs[2]
    # pixels follow their labels
    data, lab = run_batches(layer, top, 1)[0]
    assert np.array_equal(data[:, 0, 0, 0], lab)
    layer.close()


def test_order_follows_the_seed_and_off_keeps_key_order(tmp_path: Path) -> None:
    db = counting_db(tmp_path, n=10)
    a, ta = shuffled_layer(db, 5, seed=3)
    b, tb = shuffled_layer(db, 5, seed=3)
    c, tc = shuffled_layer(db, 5, seed=4)
    plain, tp = shuffled_layer(db, 5, shuffle=False)
    first = labels(a, ta, 4)
    assert first == labels(b, tb, 4)
    assert first != labels(c, tc, 4)
    assert labels(plain, tp, 4) == list(range(10)) * 2
    for layer in (a, b, c, plain):
        layer.close()


def test_resume_mid_epoch_continues_the_sequence(tmp_path: Path) -> None:
    db = counting_db(tmp_path, n=10)
    straight, ts = shuffled_layer(db, 3)
    expected = labels(straight, ts, 9)
    first, tf = shuffled_layer(db, 3)
    got = labels(first, tf, 5)
    state = first.get_state()
    first.close()
    assert state["cursor"] == 15  # counts across epochs
    resumed, tr = shuffled_layer(db, 3)
    resumed.set_state(state)
    got += labels(resumed, tr, 4)
    assert got == expected
    straight.close()
    resumed.close()
