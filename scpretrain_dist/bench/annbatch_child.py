"""The annbatch peer of ``scpretrain bench loader``, run by the Python of annbatch's own venv
(annbatch needs Python >= 3.12; this package's environment is 3.11), so it imports nothing of
this package: it reads a JSON spec, prints one JSON result line.

``layout``: the same cells (one ``.h5ad`` of the atlas) into annbatch's recommended on-disk
layout, a pre-shuffled, sharded zarr ``DatasetCollection`` (zarrs codec pipeline).
``load``: its ``Loader`` over that collection, shuffling on, the bench's batch size, its default
chunk size and preload; batches timed as the parent's loaders are.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _rss_mib() -> float:
    """Peak RSS of this program (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _zarrs() -> None:
    import zarr

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def layout(spec: dict) -> dict:
    import numpy as np
    from annbatch import DatasetCollection

    _zarrs()
    t0 = time.perf_counter()
    DatasetCollection(spec["out"]).add_adatas([spec["h5ad"]], shuffle=True, rng=np.random.default_rng(spec["seed"]))
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib": round(_rss_mib(), 1)}


def load(spec: dict) -> dict:
    import numpy as np
    from annbatch import DatasetCollection, Loader

    _zarrs()
    rss0 = _rss_mib()
    loader = Loader(batch_size=spec["batch_size"], shuffle=True, preload_to_gpu=False,
                    rng=np.random.default_rng(spec["seed"])).use_collection(DatasetCollection(spec["collection"]))
    names = spec["datasets"]
    code = {n: i for i, n in enumerate(names)}
    bs, n, warm = spec["batch_size"], spec["batches"], spec["warmup"]
    entropies, cells, t0, cpu0, i = [], 0, None, 0.0, 0
    while len(entropies) < n:
        for batch in loader:
            if i == warm:
                t0, cpu0 = time.perf_counter(), _cpu()
            X = batch["X"]
            X.data.sum()  # the values reach the loop (what a training step reads first)
            if i >= warm:
                origin = np.array([code[d] for d in batch["obs"]["dataset_id"].astype(str)])
                p = np.bincount(origin, minlength=len(names)) / len(origin)
                p = p[p > 0]
                entropies.append(float(-(p * np.log(p)).sum()))
                cells += X.shape[0]
            i += 1
            if len(entropies) == n:
                break
    seconds = time.perf_counter() - t0
    return {"loader": "annbatch", "cells_per_s": cells / seconds, "seconds": round(seconds, 2), "cells": cells,
            "cpu_ms_per_1k_cells": round(1e6 * (_cpu() - cpu0) / cells, 1),
            "mean_entropy": float(np.mean(entropies)), "peak_rss_mib": round(_rss_mib(), 1),
            "rss_after_imports_mib": round(rss0, 1), "children_peak_rss_mib": 0.0,
            "store": {"collection": spec["collection"], "batch_size": bs}}


if __name__ == "__main__":
    spec = json.loads(sys.argv[2])
    print(json.dumps({"layout": layout, "load": load}[sys.argv[1]](spec)))
