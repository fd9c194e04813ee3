"""Print a training log's loss curve as a table: iteration, learning rate, train loss, and the
outputs of every test net, one row per iteration that displayed or tested.

    python scripts/log_curve.py snapshots/lenet_adam.log
    python scripts/log_curve.py LOG --train-outputs      # also each train net output
    python scripts/log_curve.py LOG --csv > curve.csv

Reads netforge's logs and Caffe's (glog lines, as tools/extra/parse_log.py does):
``Iteration N (... iter/s ...), loss = X`` (older Caffe: ``Iteration N, loss = X``),
``Iteration N, lr = X``, ``Iteration N, Testing net (#k)`` followed by ``Test loss: X`` (with
test_compute_loss; the column ``total_loss``) and ``Test net output #j: NAME = X``, and
``Train net output #j: NAME = X``.
Columns of test outputs are named ``test NAME``, or ``test#k NAME`` when there are several test
nets. A value that was not logged at an iteration is left blank. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import signal
import sys
from collections.abc import Iterable

NUMBER = r"([-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|nan|inf))"
TRAIN_LOSS = re.compile(r"\bIteration (\d+)(?: \([^)]*\))?, loss = " + NUMBER)
LEARNING_RATE = re.compile(r"\bIteration (\d+), lr = " + NUMBER)
TESTING = re.compile(r"\bIteration (\d+), Testing net \(#(\d+)\)")
TEST_LOSS = re.compile(r"\bTest loss: " + NUMBER)
OUTPUT = re.compile(r"\b(Train|Test) net output #\d+: (\S+) = " + NUMBER)


def parse(lines: Iterable[str]) -> tuple[dict[int, dict[str, float]], list[str]]:
    """{iteration: {column: value}} and the columns in the order they first appeared."""
    rows: dict[int, dict[str, float]] = {}
    columns: list[str] = []
    test_nets: set[int] = set()
    last_iter = 0          # the iteration that Train net outputs belong to
    testing: tuple[int, int] | None = None

    def put(it: int, column: str, value: str) -> None:
        if column not in columns:
            columns.append(column)
        rows.setdefault(it, {})[column] = float(value)

    for line in lines:
        if m := TESTING.search(line):
            testing = (int(m.group(1)), int(m.group(2)))
            test_nets.add(testing[1])
        elif m := LEARNING_RATE.search(line):
            put(int(m.group(1)), "lr", m.group(2))
        elif m := TRAIN_LOSS.search(line):
            last_iter = int(m.group(1))
            testing = None
            put(last_iter, "loss", m.group(2))
        elif (m := TEST_LOSS.search(line)) and testing is not None:
            put(testing[0], f"test#{testing[1]} total_loss", m.group(1))
        elif m := OUTPUT.search(line):
            kind, name, value = m.groups()
            if kind == "Train":
                put(last_iter, f"train {name}", value)
            elif testing is not None:
                put(testing[0], f"test#{testing[1]} {name}", value)
    if len(test_nets) <= 1:  # one test net: no need to number it
        renamed = {c: c.replace("test#0 ", "test ", 1) for c in columns}
        rows = {it: {renamed[c]: v for c, v in r.items()} for it, r in rows.items()}
        columns = [renamed[c] for c in columns]
    return rows, columns


def order(columns: list[str], train_outputs: bool) -> list[str]:
    """lr, loss, then the test columns (by net), then the train outputs when asked for."""
    head = [c for c in ("lr", "loss") if c in columns]
    tests = [c for c in columns if c.startswith("test")]
    train = [c for c in columns if c.startswith("train ")] if train_outputs else []
    return head + sorted(tests, key=lambda c: c.split(" ", 1)[0]) + train


def fmt(value: float | None) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else f"{value:.6g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", help="a netforge or Caffe training log ('-' for stdin)")
    ap.add_argument("--train-outputs", action="store_true",
                    help="add a column for each train net output (raw, not smoothed)")
    ap.add_argument("--csv", action="store_true", help="comma-separated output")
    args = ap.parse_args(argv)
    if args.log == "-":
        rows, columns = parse(sys.stdin)
    else:
        try:
            with open(args.log, encoding="utf-8", errors="replace") as f:
                rows, columns = parse(f)
        except OSError as e:
            print(f"log_curve: cannot read {args.log}: {e.strerror}", file=sys.stderr)
            return 2
    if not rows:
        print(f"log_curve: no iterations found in {args.log}", file=sys.stderr)
        return 1
    cols = order(columns, args.train_outputs)
    table = [["iter", *cols]] + [[str(it), *(fmt(rows[it].get(c)) for c in cols)]
                                 for it in sorted(rows)]
    if args.csv:
        csv.writer(sys.stdout, lineterminator="\n").writerows(table)
        return 0
    widths = [max(len(row[j]) for row in table) for j in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `log_curve.py LOG | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
