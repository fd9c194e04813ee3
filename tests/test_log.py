"""Log lines in Caffe's glog format, checked with the patterns Caffe's tools/extra/parse_log.py
and parse_log.sh rely on (reference §7), on a real training log file."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest

from netforge.cli import main
from netforge.log import fmt

# The patterns parse_log.py uses, and the glog prefix.
ITERATION = re.compile(r"Iteration (\d+)")
TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} [ \d]{5}\d* [\w.]+:\d+\] ")


def line_time(line: str) -> datetime:
    """extract_datetime_from_line: month/day from token 0, time from token 1."""
    tokens = line.split()
    return datetime.strptime(f"2026{tokens[0][1:3]}{tokens[0][3:]} {tokens[1]}",
                             "%Y%m%d %H:%M:%S.%f")


def parse(lines: list[str]) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The row logic of parse_log.py: rows keyed by NumIters, carrying the latest lr."""
    train: list[dict[str, float]] = []
    test: list[dict[str, float]] = []
    it, lr = -1, float("nan")
    for line in lines:
        m = ITERATION.search(line)
        if m:
            it = int(m.group(1))
        if it == -1:
            continue
        m = LEARNING_RATE.search(line)
        if m:
            lr = float(m.group(1))
        for regex, rows in ((TRAIN_OUTPUT, train), (TEST_OUTPUT, test)):
            m = regex.search(line)
            if m:
                if not rows or rows[-1]["NumIters"] != it:
                    rows.append({"NumIters": it, "LearningRate": lr})
                rows[-1][m.group(2)] = float(m.group(3))
    return train, test


@pytest.fixture
def log_lines(workspace: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    code = main(["train", "--solver", "solvers/lenet_solver.yaml", "--log", "run/train.log",
                 "--set", "max_iter=8", "--set", "test_iter=[2]", "--set", "test_interval=4",
                 "--set", "display=2", "--set", "snapshot=0"])
    assert code == 0, capsys.readouterr().err
    return Path("run/train.log").read_text().splitlines()


def test_log_file_header_and_prefix(log_lines: list[str]) -> None:
    assert log_lines[0].startswith("Log file created at: ")
    assert log_lines[1].startswith("Running on machine: ")
    assert log_lines[2] == ("Log line format: [IWEF]mmdd hh:mm:ss.uuuuuu threadid file:line] msg")
    body = log_lines[3:]
    assert all(line.strip() for line in body), "a blank line crashes parse_log.py"
    for line in body:
        assert PREFIX.match(line), line
        line_time(line)


def test_solving_line_comes_before_any_iteration(log_lines: list[str]) -> None:
    solving = next(i for i, line in enumerate(log_lines) if "Solving " in line)
    first_iter = next(i for i, line in enumerate(log_lines) if ITERATION.search(line))
    assert solving < first_iter


def test_parse_log_rows(log_lines: list[str]) -> None:
    train, test = parse(log_lines)
    assert [r["NumIters"] for r in train] == [0, 2, 4, 6]
    assert all(set(r) == {"NumIters", "LearningRate", "loss"} for r in train)
    assert [r["NumIters"] for r in test] == [0, 4, 8]
    assert all(list(r)[2:] == ["accuracy", "loss"] for r in test)
    assert train[2]["LearningRate"] == pytest.approx(0.0099985, rel=1e-5)  # lr of iteration 2


def test_parse_log_sh_token_positions(log_lines: list[str]) -> None:
    tests0 = [line.split()[10] for line in log_lines if "Test net output #0" in line]
    assert tests0 and all(0.0 <= float(v) <= 1.0 for v in tests0)
    lrs = [line.split()[8] for line in log_lines if ", lr = " in line]
    assert float(lrs[0]) == pytest.approx(0.01)
    losses = [line.split("=")[1] for line in log_lines if ", loss = " in line]
    assert all(float(v) > 0 for v in losses)


def test_iteration_line_shape(log_lines: list[str]) -> None:
    pattern = re.compile(r"\] Iteration (\d+) \(([\d.e+-]+) iter/s, ([\d.e+-]+)s/2 iters\), "
                         r"loss = ([\d.e+-]+)$")
    matches = [pattern.search(line) for line in log_lines]
    assert [int(m.group(1)) for m in matches if m] == [0, 2, 4, 6]
    assert any(line.endswith(" Optimization Done.") for line in log_lines)


@pytest.mark.parametrize(("x", "text"), [
    (0.00992565432, "0.00992565"), (1e-5, "1e-05"), (2.302585, "2.30259"), (0.0, "0"),
    (1234567.0, "1.23457e+06")])
def test_numbers_print_like_ostream(x: float, text: str) -> None:
    assert fmt(x) == text
