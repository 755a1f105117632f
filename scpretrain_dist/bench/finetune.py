"""Fine-tuning time at each torch thread count, on an idle machine and beside busy processes.

One fine-tuning run (``train.finetune.finetune``, the paper's network, a fixed number of epochs)
on synthetic sparse cells of a real dataset's shape, at ``finetune.threads`` = each of
``--threads``; then again while ``--busy`` other processes spin on the CPUs, as a test worker,
a Ray worker or a second evaluation would. One untimed run first (allocations, first calls), then
the runs interleaved (every thread count once per repeat); the median wall time is reported. The
first thread count of ``--threads`` is reported as ours, the others as peers.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import statistics
import time

from scpretrain_dist.bench.report import result


def add_arguments(p) -> None:
    p.add_argument("--cells", type=int, default=1100, help="training cells (+10%% validation)")
    p.add_argument("--genes", type=int, default=15000)
    p.add_argument("--nonzeros", type=int, default=1500, help="measured genes per cell")
    p.add_argument("--types", type=int, default=8)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts; the first is ours")
    p.add_argument("--busy", type=int, default=1, help="busy processes in the second round (0: idle only)")
    p.add_argument("--repeats", type=int, default=3)


def _spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def _one_run(X, y, n_types: int, epochs: int, threads: int) -> float:
    from scpretrain_dist.config import FinetuneConfig, ModelConfig
    from scpretrain_dist.train.finetune import finetune

    n = X.shape[0] - X.shape[0] // 11
    cfg = dataclasses.replace(FinetuneConfig(), max_epochs=epochs, patience=epochs, threads=threads)
    t0 = time.perf_counter()
    finetune(X[:n], y[:n], X[n:], y[n:], n_types, cfg, ModelConfig(), seed=0)
    return time.perf_counter() - t0


def run(args) -> dict:
    import numpy as np
    import scipy.sparse as sp
    import torch

    rng = np.random.default_rng(0)
    X = sp.random(args.cells, args.genes, density=args.nonzeros / args.genes, format="csr", random_state=0,
                  dtype=np.float32)
    X.data = np.log1p(rng.poisson(2.0, X.nnz) + 1).astype(np.float32)
    y = rng.integers(0, args.types, args.cells)
    counts = [int(t) for t in args.threads.split(",")]
    available = torch.get_num_threads()
    rounds = {"idle": 0} | ({f"{args.busy} busy": args.busy} if args.busy else {})
    seconds: dict[str, dict[int, float]] = {}
    for name, busy in rounds.items():
        stop = mp.Event()
        spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
        for s in spinners:
            s.start()
        try:
            _one_run(X, y, args.types, 1, counts[0])
            times: dict[int, list[float]] = {t: [] for t in counts}
            for _ in range(args.repeats):
                for t in counts:
                    torch.set_num_threads(t)  # finetune caps at its setting, never above what it finds
                    times[t].append(_one_run(X, y, args.types, args.epochs, t))
        finally:
            stop.set()
            for s in spinners:
                s.join()
        seconds[name] = {t: statistics.median(v) for t, v in times.items()}
        print(f"bench finetune: {name}: " + ", ".join(f"{t} thread(s) {s:.1f} s" for t, s in seconds[name].items()))
    torch.set_num_threads(available)
    worst = list(rounds)[-1]
    ours, peers = counts[0], counts[1:]
    return result("finetune", f"seconds per fine-tuning run ({worst})", seconds[worst][ours],
                  {f"{t}_threads": seconds[worst][t] for t in peers}, higher_is_better=False,
                  seconds=seconds, cells=args.cells, genes=args.genes, nonzeros=args.nonzeros, epochs=args.epochs,
                  ours_is=f"finetune.threads={ours}", torch_threads_available=available)
