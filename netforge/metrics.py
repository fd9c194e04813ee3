"""Training metrics: Caffe's parse_log.py tables, a JSONL metrics stream, and loss/lr plots.

* :func:`parse_log` reads a glog-style training log (netforge's or Caffe's) the way Caffe's
  tools/extra/parse_log.py does and returns the rows of its ``.train`` and ``.test`` tables
  (``NumIters,Seconds,LearningRate,<outputs in order of appearance>``); :func:`save_csv_files`
  writes them.
* :class:`MetricsHandler` is a logging handler that turns netforge's own display and test
  records into one JSON object per line (``<log stem>.jsonl`` beside the log when training).
* :func:`load_metrics` reads either a log or a JSONL stream into :class:`Metrics`, and
  :func:`plot_metrics` draws train loss, test outputs and the learning rate into an image
  (matplotlib, an optional dependency: ``pip install netforge[plot]``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from netforge.errors import ConfigError

METRICS_FORMAT = "netforge-metrics-1"

_NUM = r"[-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|-?inf)"
RE_ITERATION = re.compile(r"Iteration (\d+)")
RE_TRAIN_OUTPUT = re.compile(rf"Train net output #(\d+): (\S+) = ({_NUM})(.*)$")
RE_TEST_OUTPUT = re.compile(rf"Test net output #(\d+): (\S+) = ({_NUM})(.*)$")
RE_LR = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
RE_DISPLAY = re.compile(rf"Iteration (\d+) \(.*\), loss = ({_NUM})")
RE_FINAL_LOSS = re.compile(rf"Iteration (\d+), loss = ({_NUM})")
RE_TESTING = re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)")
RE_TEST_LOSS = re.compile(rf"Test loss: ({_NUM})")
RE_LR_LINE = re.compile(r"Iteration (\d+), lr = (\S+)")
RE_GLOG = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{1,6})\s")


# ---------------------------------------------------------------------------------------------
# parse_log.py


def log_year(path: str | os.PathLike[str]) -> int:
    """extract_seconds.get_log_created_year: the year of the file's ctime."""
    return datetime.fromtimestamp(os.path.getctime(path)).year


def line_time(line: str, year: int) -> datetime | None:
    """The glog timestamp of a line (``Immdd hh:mm:ss.uuuuuu``), or None without one."""
    m = RE_GLOG.match(line)
    if not m:
        return None
    month, day, hh, mm, ss = (int(g) for g in m.groups()[:5])
    micro = int(m.group(6).ljust(6, "0"))
    try:
        return datetime(year, month, day, hh, mm, ss, micro)
    except ValueError:
        return None


class _Clock:
    """Seconds since the 'Solving' line; the year rolls over when the month decreases
    (extract_seconds.extract_datetime_from_line)."""

    def __init__(self, year: int):
        self.year = year
        self.last_month = 0
        self.start: datetime | None = None

    def at(self, line: str) -> datetime | None:
        t = line_time(line, self.year)
        if t is None:
            return None
        if t.month < self.last_month:
            self.year += 1
            t = t.replace(year=self.year)
        self.last_month = t.month
        return t


def parse_log(path: str | os.PathLike[str]) -> tuple[list[dict[str, float]],
                                                     list[dict[str, float]]]:
    """(train rows, test rows) of a training log, as Caffe's parse_log.py builds them.

    Each row is ``{"NumIters", "Seconds", "LearningRate", <output>...}``. Seconds count from the
    first line containing "Solving". Differences from parse_log.py, all on logs it crashes on
    or drops values of: blank and unstamped lines are skipped, ``nan``/``inf`` values are kept,
    a log without a "Solving" line counts seconds from its first stamped line, and the last
    row is kept even when it is the table's only row (parse_log.py only writes a row once a
    later one starts or it is as long as the first).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError("log file not found", str(path))
    clock = _Clock(log_year(p))
    iteration = -1
    lr = math.nan
    train: list[dict[str, float]] = []
    test: list[dict[str, float]] = []
    rows: dict[str, dict[str, float] | None] = {"train": None, "test": None}
    with open(p, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    first_stamp: datetime | None = None
    for line in lines:
        if "Solving" in line:
            clock.start = clock.at(line)
            if clock.start is not None:
                break
        if first_stamp is None:
            first_stamp = line_time(line, clock.year)
    if clock.start is None:
        clock = _Clock(log_year(p))
        clock.start = first_stamp
    for line in lines:
        m = RE_ITERATION.search(line)
        if m:
            iteration = int(m.group(1))
        if iteration == -1:
            continue
        t = clock.at(line)
        if t is None:
            continue
        seconds = (t - clock.start).total_seconds() if clock.start is not None else 0.0
        m = RE_LR.search(line)
        if m:
            lr = float(m.group(1))
        for kind, regex, table in (("train", RE_TRAIN_OUTPUT, train),
                                   ("test", RE_TEST_OUTPUT, test)):
            rows[kind] = _add_output(regex, rows[kind], table, line, iteration, seconds, lr)
    for kind, table in (("train", train), ("test", test)):
        row = rows[kind]
        if row is not None:  # parse_log.py drops it (e.g. the only test of a short run)
            table.append(row)
        if len(table) > 1:
            table[0]["LearningRate"] = table[1]["LearningRate"]
    return train, test


def _add_output(regex: re.Pattern[str], row: dict[str, float] | None,
                table: list[dict[str, float]], line: str, iteration: int, seconds: float,
                lr: float) -> dict[str, float] | None:
    m = regex.search(line)
    if m:
        if row is None or row["NumIters"] != iteration:
            if row is not None:
                table.append(row)
            row = {"NumIters": iteration, "Seconds": seconds, "LearningRate": lr}
        row[m.group(2)] = float(m.group(3))
    if row is not None and table and len(row) == len(table[0]):
        table.append(row)
        row = None
    return row


def _columns(rows: Sequence[dict[str, float]]) -> list[str]:
    names: dict[str, None] = {"NumIters": None, "Seconds": None, "LearningRate": None}
    for r in rows:
        for k in r:
            names.setdefault(k, None)
    return list(names)


def _cell(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def save_csv_files(log_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                   train: Sequence[dict[str, float]], test: Sequence[dict[str, float]],
                   delimiter: str = ",") -> tuple[Path, Path]:
    """Write ``<out_dir>/<log basename>.train`` and ``.test`` (parse_log.py's save_csv_files)."""
    if len(delimiter) != 1:
        raise ConfigError(f"the delimiter must be one character (got {delimiter!r})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(log_path).name
    paths = (out / f"{base}.train", out / f"{base}.test")
    for rows, target in zip((train, test), paths, strict=True):
        cols = _columns(rows)
        with open(target, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
            w.writerow(cols)
            for r in rows:
                w.writerow([_cell(r[c]) if c in r else "" for c in cols])
    return paths


# ---------------------------------------------------------------------------------------------
# the JSONL stream


class MetricsHandler(logging.Handler):
    """Turns netforge's display and test log records into JSON lines.

    One object per display: ``{"type": "train", "iteration", "seconds", "lr", "loss",
    "outputs": {name: value}}`` (``loss`` is the smoothed loss of the display line) and one per
    test of each test net: ``{"type": "test", "iteration", "seconds", "net", "outputs",
    "loss_outputs": [names of outputs with a loss weight], "test_loss"?}``. The first line is
    ``{"type": "start", "format": "netforge-metrics-1", ...}``. An output with several elements
    becomes a list. Each line is flushed as it is written, so the file can be tailed.
    When ``solver`` is given, the display loss is the solver's exact smoothed loss rather than
    the 6 digits of the log line.
    """

    def __init__(self, path: str | os.PathLike[str], solver: Any = None):
        super().__init__(level=logging.INFO)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.solver = solver
        self.start: float | None = None
        self.pending: dict[str, Any] | None = None
        self._stream = open(self.path, "a", encoding="utf-8")
        self._started = False

    # -- writing -----------------------------------------------------------------------------
    def _write(self, obj: dict[str, Any]) -> None:
        if self._stream.closed:
            return
        self._stream.write(json.dumps(obj, allow_nan=True) + "\n")
        self._stream.flush()

    def _seconds(self, created: float) -> float:
        if self.start is None:
            self.start = created
        return round(created - self.start, 6)

    def _flush_pending(self) -> None:
        if self.pending is not None:
            self._write(self.pending)
            self.pending = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._handle(record)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)

    def _handle(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("Solving "):
            self.start = record.created
            if not self._started:
                self._started = True
                self._write({"type": "start", "format": METRICS_FORMAT,
                             "net": msg[len("Solving "):],
                             "time": datetime.fromtimestamp(record.created).isoformat(),
                             "solver": str(getattr(self.solver, "path", "") or "")})
            return
        out = RE_TRAIN_OUTPUT.search(msg) or RE_TEST_OUTPUT.search(msg)
        if out is not None and self.pending is not None:
            name, value = out.group(2), float(out.group(3))
            outputs = self.pending["outputs"]
            if name in outputs:
                prev = outputs[name]
                outputs[name] = [*prev, value] if isinstance(prev, list) else [prev, value]
            else:
                outputs[name] = value
            if self.pending["type"] == "test":
                self.pending["seconds"] = self._seconds(record.created)
            if "loss)" in out.group(4) and self.pending["type"] == "test" \
                    and name not in self.pending["loss_outputs"]:
                self.pending["loss_outputs"].append(name)
            return
        m = RE_LR_LINE.search(msg)
        if m and self.pending is not None and self.pending["type"] == "train" \
                and self.pending["iteration"] == int(m.group(1)):
            self.pending["lr"] = float(m.group(2))
            self._flush_pending()
            return
        m_test_loss = RE_TEST_LOSS.search(msg)
        if m_test_loss and self.pending is not None and self.pending["type"] == "test":
            self.pending["test_loss"] = float(m_test_loss.group(1))
            return
        m = RE_DISPLAY.search(msg) or RE_FINAL_LOSS.search(msg)
        if m is None and RE_TESTING.search(msg) is None:
            # Other records (data threads, snapshots) leave a pending event open, except the
            # ends of a run.
            if msg.startswith(("Optimization", "Snapshotting")) or record.levelno >= logging.ERROR:
                self._flush_pending()
            return
        self._flush_pending()
        if m:
            loss = float(m.group(2))
            if self.solver is not None and int(m.group(1)) == self.solver.iter:
                loss = float(self.solver.smoothed_loss)
            self.pending = {"type": "train", "iteration": int(m.group(1)),
                            "seconds": self._seconds(record.created), "lr": None, "loss": loss,
                            "outputs": {}}
            if RE_DISPLAY.search(msg) is None:  # the final forward-only pass: no lr line
                self._flush_pending()
            return
        m = RE_TESTING.search(msg)
        if m:
            self.pending = {"type": "test", "iteration": int(m.group(1)),
                            "seconds": self._seconds(record.created), "net": int(m.group(2)),
                            "outputs": {}, "loss_outputs": []}

    def close(self) -> None:
        try:
            self._flush_pending()
            if not self._stream.closed:
                self._stream.close()
        finally:
            super().close()


def metrics_path(log_file: str | os.PathLike[str]) -> Path:
    """``<log file stem>.jsonl`` beside the log."""
    p = Path(log_file)
    return p.with_name(p.stem + ".jsonl")


def attach_metrics(solver: Any, log_file: str | os.PathLike[str],
                   logger: logging.Logger | None = None) -> MetricsHandler:
    """Write ``<log stem>.jsonl`` beside ``log_file`` while ``solver`` trains.

    The handler sits on the ``netforge`` logger; like nflog.configure()'s handlers it is
    removed (and its file closed) by the next nflog.configure() call, or call its close() and
    remove it yourself.
    """
    lg = logger or logging.getLogger("netforge")
    handler = MetricsHandler(metrics_path(log_file), solver)
    handler._netforge = True  # type: ignore[attr-defined]
    lg.addHandler(handler)
    if lg.level == logging.NOTSET or lg.level > logging.INFO:
        lg.setLevel(logging.INFO)
    return handler


# ---------------------------------------------------------------------------------------------
# reading either back


@dataclass
class Series:
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)

    def add(self, x: float, y: float) -> None:
        self.x.append(x)
        self.y.append(y)


@dataclass
class Metrics:
    """Curves by name: the smoothed train loss, each train and test output, the lr."""

    train_loss: Series = field(default_factory=Series)
    lr: Series = field(default_factory=Series)
    train: dict[str, Series] = field(default_factory=dict)
    test: dict[str, Series] = field(default_factory=dict)
    losses: set[str] = field(default_factory=set)


def _scalar(v: Any) -> float:
    if isinstance(v, list):
        return float(sum(v) / len(v)) if v else math.nan
    return float(v) if v is not None else math.nan


def load_jsonl(path: str | os.PathLike[str]) -> Metrics:
    m = Metrics()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"not a JSON line: {e.msg}", f"{path}:{n}") from None
            kind = obj.get("type")
            it = float(obj.get("iteration", 0))
            if kind == "train":
                if obj.get("loss") is not None:
                    m.train_loss.add(it, float(obj["loss"]))
                if obj.get("lr") is not None:
                    m.lr.add(it, float(obj["lr"]))
                for name, v in obj.get("outputs", {}).items():
                    m.train.setdefault(name, Series()).add(it, _scalar(v))
            elif kind == "test":
                label = name_for_test(obj.get("net", 0))
                for name, v in obj.get("outputs", {}).items():
                    m.test.setdefault(label + name, Series()).add(it, _scalar(v))
                m.losses.update(label + n for n in obj.get("loss_outputs", []))
    return m


def name_for_test(net: int) -> str:
    return "" if net == 0 else f"#{net} "


def load_log(path: str | os.PathLike[str]) -> Metrics:
    """Curves from a glog training log: display losses and lr lines plus the output lines."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("log file not found", str(path))
    m = Metrics()
    net = 0
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            d = RE_DISPLAY.search(line) or RE_FINAL_LOSS.search(line)
            if d:
                it = float(d.group(1))
                m.train_loss.add(it, float(d.group(2)))
                continue
            lr = RE_LR_LINE.search(line)
            if lr:
                m.lr.add(float(lr.group(1)), float(lr.group(2)))
                continue
            t = RE_TESTING.search(line)
            if t:
                it, net = float(t.group(1)), int(t.group(2))
                continue
            o = RE_TRAIN_OUTPUT.search(line)
            if o and m.train_loss.x:
                m.train.setdefault(o.group(2), Series()).add(m.train_loss.x[-1],
                                                            float(o.group(3)))
                continue
            o = RE_TEST_OUTPUT.search(line)
            if o:
                name = name_for_test(net) + o.group(2)
                s = m.test.setdefault(name, Series())
                if s.x and s.x[-1] == it:  # one output with several elements: keep the first
                    continue
                s.add(it, float(o.group(3)))
                if "loss)" in o.group(4):
                    m.losses.add(name)
    return m


def load_metrics(path: str | os.PathLike[str]) -> Metrics:
    """A training log or a ``.jsonl`` metrics stream."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("file not found", str(path))
    if p.suffix == ".jsonl":
        return load_jsonl(p)
    return load_log(p)


# ---------------------------------------------------------------------------------------------
# plotting

PLOT_PANELS = ("loss", "accuracy", "lr")


def parse_what(what: str) -> list[str]:
    panels = [w.strip().lower() for w in what.split(",") if w.strip()]
    bad = [w for w in panels if w not in PLOT_PANELS]
    if bad or not panels:
        raise ConfigError(f"--what takes a comma-separated list of {', '.join(PLOT_PANELS)} "
                          f"(got {what!r})")
    return list(dict.fromkeys(panels))


def plot_metrics(metrics: Metrics, out: str | os.PathLike[str],
                 panels: Iterable[str] = PLOT_PANELS, title: str | None = None) -> Path:
    """Draw the chosen panels (loss, accuracy = non-loss outputs, lr) against iterations.

    Needs matplotlib (``pip install netforge[plot]``); uses the Agg canvas, never a window.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plot needs matplotlib, which is not installed: "
                          "pip install netforge[plot]") from None
    panels = list(panels)
    fig = Figure(figsize=(8, 2.8 * len(panels) + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    drawn = 0
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "loss":
            if metrics.train_loss.x:
                ax.plot(metrics.train_loss.x, metrics.train_loss.y, label="train loss (smoothed)")
                drawn += 1
            for name, s in metrics.test.items():
                if name in metrics.losses:
                    ax.plot(s.x, s.y, marker="o", ms=3, label=f"test {name}")
                    drawn += 1
            ax.set_ylabel("loss")
        elif panel == "accuracy":
            for name, s in metrics.test.items():
                if name not in metrics.losses:
                    ax.plot(s.x, s.y, marker="o", ms=3, label=f"test {name}")
                    drawn += 1
            for name, s in metrics.train.items():
                if "loss" not in name:
                    ax.plot(s.x, s.y, label=f"train {name}")
                    drawn += 1
            ax.set_ylabel("test outputs")
        else:
            if metrics.lr.x:
                ax.plot(metrics.lr.x, metrics.lr.y, color="tab:green", label="lr")
                drawn += 1
            ax.set_ylabel("learning rate")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
    if not drawn:
        raise ConfigError("nothing to plot: no display, test or lr lines found")
    axes[-1].set_xlabel("iteration")
    if title:
        fig.suptitle(title)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target)
    return target

