"""netforge vs PyTorch on the same CPU: LeNet and cifar10_quick train steps and inference.

    python scripts/bench.py [--rounds 15] [--steps 10] [--threads N]

Both nets are Caffe's own definitions (tests/fixtures/caffe), with their Data layers replaced
by Input blobs filled once, so only the network and the solver update are timed. Each round
times `--steps` SGD steps (momentum 0.9, weight decay 5e-4) of netforge, then of PyTorch
(A B A B …, so machine noise hits both alike), each block after a pause (so that neither runs while
the other's thread pool still spins) and a few untimed steps (to time the steady state);
medians of the per-step times are compared ("ratio"), and the median and quartiles of the
rounds' own ratios are printed beside it ("per round": a round times both back to back, so its
ratio does not move with the machine's speed). Inference is timed the same way (LeNet
TEST-phase forward, batch 100). The GEMM floor is the net's multiply-add work divided by the
best sgemm rate measured here at the start ("vs floor": the median step over it); each round
also takes a short sgemm sample, and the median and quartiles of the rounds' step over their
own floor are printed beside it ("per round", free of the spell the start samples fell in).
PyTorch is optional: without it only netforge's numbers and the floors are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from netforge import Net, Solver  # noqa: E402
from netforge.config import load_net_param  # noqa: E402
from netforge.proto import pb  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "caffe"
LABEL = 34  # width of the benchmark-name column
NETS = {  # name: (file, batch, input shape)
    "lenet": ("lenet_train_test.prototxt", 64, (1, 28, 28)),
    "cifar10_quick": ("cifar10_quick_train_test.prototxt", 100, (3, 32, 32)),
}


def input_net(name: str, batch: int, phase: int) -> pb.NetParameter:
    """The fixture net for ``phase`` with its Data layers replaced by one Input layer."""
    file, _, shape = NETS[name]
    param, _ = load_net_param(FIXTURES / file)
    out = pb.NetParameter(name=param.name)
    inp = out.layer.add(name="input", type="Input")
    inp.top.extend(["data", "label"])
    inp.input_param.shape.add().dim.extend([batch, *shape])
    inp.input_param.shape.add().dim.extend([batch])
    for layer in param.layer:
        if layer.type == "Data":
            continue
        if any(r.phase != phase for r in layer.include if r.HasField("phase")):
            continue
        out.layer.add().CopyFrom(layer)
        del out.layer[-1].include[:]
    return out


def fill_inputs(net: Net, batch: int, shape: tuple[int, ...], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    net.blobs["data"].data[...] = rng.random((batch, *shape), dtype=np.float32)
    net.blobs["label"].data[...] = rng.integers(0, 10, size=batch)


def netforge_solver(name: str) -> Solver:
    _, batch, shape = NETS[name]
    sp = pb.SolverParameter(base_lr=0.001, momentum=0.9, weight_decay=0.0005,
                            lr_policy="fixed", random_seed=1, display=0)
    sp.net_param.CopyFrom(input_net(name, batch, pb.TRAIN))
    solver = Solver(sp, verbose=False)
    fill_inputs(solver.net, batch, shape)
    return solver


def torch_model(name: str):  # type: ignore[no-untyped-def]
    from torch import nn

    if name == "lenet":
        return nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.MaxPool2d(2, 2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2, 2),
            nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2), nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU(),
        nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.Linear(64, 10))


def torch_step(name: str) -> Callable[[], None]:
    import torch
    from torch import nn

    model = torch_model(name)
    _, batch, shape = NETS[name]
    x = torch.rand((batch, *shape))
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=0.0005)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return step


def torch_infer(name: str, batch: int) -> Callable[[], None]:
    import torch

    model = torch_model(name)
    model.eval()
    x = torch.rand((batch, *NETS[name][2]))

    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def gemm_sample(seconds: float) -> float:
    """sgemm GFLOP/s on shapes like LeNet's conv2 (one big GEMM, NumPy's OpenBLAS on every
    core) over ``seconds``, after a pause."""
    rng = np.random.default_rng(0)
    a = rng.random((512, 500), dtype=np.float32)
    b = rng.random((500, 4096), dtype=np.float32)
    a @ b
    time.sleep(SETTLE_S)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 512 * 500 * 4096 * n / (time.perf_counter() - start) / 1e9


def gemm_rate(samples: int = 6, seconds: float = 0.25) -> float:
    """The best of a few sgemm samples (gemm_sample), a pause apart. On a shared VM one sample
    can land in a slow spell (a single 1 s sample once read 100 instead of ~175 GFLOP/s), and
    the floor should be the machine's."""
    return max(gemm_sample(seconds) for _ in range(samples))


def gemm_flops(net: Net, train: bool) -> float:
    """Multiply-add FLOPs of the net's Convolution and InnerProduct layers: forward, plus (when
    training) the weight gradient and, where needed, the bottom gradient."""
    total = 0.0
    for i, layer in enumerate(net.layers):
        kind = net.layer_params[i].type
        if kind not in ("Convolution", "InnerProduct"):
            continue
        w = layer.blobs[0]
        top = net.top_vecs[i][0]
        if kind == "Convolution":
            per_out = w.count // w.shape[0]          # C/g · kh · kw
            fwd = 2.0 * top.count * per_out
        else:
            fwd = 2.0 * top.count * (w.count // (top.count // top.shape[0]))
        total += fwd
        if train:
            total += fwd  # weight gradient
            if net.bottom_need_backward[i][0]:
                total += fwd  # bottom gradient
    return total


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


# Idle time before each timed block. A BLAS or OpenMP pool keeps its threads spinning for a
# while after its last call (OpenBLAS ~0.1 s); without a pause they would steal a core from
# the other framework's block that follows. (Measured: PyTorch's LeNet step ran 22.5 ms right
# after netforge steps that used OpenBLAS's own threads, 15.8 ms otherwise.)
SETTLE_S = 0.3
# Untimed steps after the pause, before the timed ones. The first steps after an idle spell run
# slowly for both frameworks (cores clocked down, caches and TLBs cold: here netforge's first
# three LeNet steps after 0.3 s idle took 17-19 ms, the rest 12 ms); a training run lives in
# the steady state, so that is what is timed.
WARM_STEPS = 3


# Each round also takes a short sgemm sample, so that the rounds' own floors can be compared
# with their step times (the "per round" column beside "vs floor").
ROUND_GEMM_S = 0.1


def interleaved(a: Callable[[], None], b: Callable[[], None] | None, rounds: int,
                steps: int, rates: list[float] | None = None
                ) -> tuple[list[float], list[float]]:
    """Seconds per call of ``a`` and of ``b`` in each of ``rounds`` rounds (A B A B …), and
    with ``rates`` each round's sgemm sample (GFLOP/s) appended to it."""
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(2):  # warm-up
        a()
        if b:
            b()
    for _ in range(rounds):
        for fn, out in ((a, ta), (b, tb)):
            if fn is None:
                continue
            time.sleep(SETTLE_S)
            for _ in range(WARM_STEPS):
                fn()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            out.append((time.perf_counter() - start) / steps)
        if rates is not None:
            rates.append(gemm_sample(ROUND_GEMM_S))
    return ta, tb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's own choice)")
    args = ap.parse_args()
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        have_torch = True
    except ImportError:
        have_torch = False
    print(f"cores: {os.cpu_count()}, numpy {np.__version__}"
          + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
             if have_torch else ", torch not installed"))
    rate = gemm_rate()
    print(f"sgemm: {rate:.1f} GFLOP/s")
    print()
    header = (f"{'benchmark':<{LABEL}}{'netforge':>12}{'pytorch':>12}{'ratio':>8}"
              f"{'per round':>19}{'GEMM floor':>12}{'vs floor':>10}{'per round':>19}")
    print(header)
    print("-" * len(header))
    for name in NETS:
        solver = netforge_solver(name)
        flops = gemm_flops(solver.net, train=True)
        rates: list[float] = []
        ta, tb = interleaved(lambda s=solver: s.step(1), torch_step(name) if have_torch else None,
                             args.rounds, args.steps, rates)
        solver.close()
        row(f"{name} train step (b{NETS[name][1]})", ta, tb, flops / rate / 1e6,
            [flops / r / 1e9 for r in rates])
    batch = 100
    net = Net(input_net("lenet", batch, pb.TEST), "TEST", verbose=False, seed=1)
    fill_inputs(net, batch, NETS["lenet"][2])
    flops = gemm_flops(net, train=False)
    rates = []
    ta, tb = interleaved(net.forward, torch_infer("lenet", batch) if have_torch else None,
                         args.rounds, args.steps, rates)
    row(f"lenet inference (b{batch})", ta, tb, flops / rate / 1e6,
        [flops / r / 1e9 for r in rates])
    print(f"{'':<{LABEL}}{batch / statistics.median(ta):>10.0f}/s"
          + (f"{batch / statistics.median(tb):>10.0f}/s" if tb else "") + "  images/s")
    return 0


def paired_ratios(ta: list[float], tb: list[float]) -> tuple[float, float, float]:
    """The median and quartiles of the per-round ratios a/b. Each round times both frameworks
    back to back, so a round's ratio is free of the machine's slower and faster spells that
    move the medians of both between runs."""
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q2, q1, q3


def row(label: str, ta: list[float], tb: list[float], floor_ms: float,
        floors: list[float] | None = None) -> None:
    """One line of the table; ``floors``: each round's GEMM floor (s) from its own sgemm
    sample, for the median and quartiles of the rounds' step / floor."""
    a = median_ms(ta)
    b = median_ms(tb) if tb else float("nan")
    ratio = f"{a / b:>8.2f}" if tb else f"{'-':>8}"
    rounds = "-"
    if tb:
        mid, q1, q3 = paired_ratios(ta, tb)
        rounds = f"{mid:.2f} ({q1:.2f}-{q3:.2f})"
    line = (f"{label:<{LABEL}}{a:>10.2f}ms{b:>10.2f}ms{ratio}{rounds:>19}{floor_ms:>10.2f}ms"
            f"{a / floor_ms:>10.2f}")
    if floors:
        mid, q1, q3 = paired_ratios(ta, floors)
        line += f"{f'{mid:.2f} ({q1:.2f}-{q3:.2f})':>19}"
    print(line)


if __name__ == "__main__":
    sys.exit(main())
