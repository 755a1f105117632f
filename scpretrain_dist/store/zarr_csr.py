"""The atlas as a zarr group of CSR arrays: the second backend, for every stage.

Layout (zarr v3 group):
    X/data, X/indices, X/indptr   float32 values, int32 gene ids, int64 row pointers (CSR)
    obs/obs_id, obs/cell_type     strings, one per cell; annotation columns beside them
    obsm/<name>                   embeddings written by ``annotate`` (cells x dim, float32)
    attrs                         ``scpretrain.genes`` (the atlas gene symbols),
                                  ``scpretrain.genes.<dataset>`` (packed gene masks),
                                  ``scpretrain.versions`` (per commit: time in ms, datasets,
                                  genes) and ``scpretrain.datasets`` (the registry)

Every commit writes the registry, the gene list and the version list in one update of the
group's metadata (zarr writes it atomically), after the data. Rows past the committed cells (a
write that failed) are invisible and cut off by the next write. A locator pinned to a version
sees the datasets and genes committed by then, so a run reads the same cells from start to end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scpretrain_dist.store.atlas import (
    GENES_KEY,
    REGISTRY_KEY,
    Atlas,
    DatasetRecord,
    StoreError,
    StreamedDataset,
    pack_mask,
    pipelined,
)

FORMAT_KEY = "scpretrain.format"
FORMAT = "csr/1"
GENE_LIST_KEY = "scpretrain.genes"
VERSIONS_KEY = "scpretrain.versions"
NNZ_CHUNK = 1 << 20
CELL_CHUNK = 1 << 16
_OBS_FIXED = ("obs_id", "cell_type")


@dataclass(frozen=True)
class ZarrLocator:
    """Picklable pointer to a zarr atlas (a directory), pinned to a commit time."""

    uri: str
    timestamp_ms: int | None = None

    def pinned(self) -> ZarrLocator:
        """The same atlas, pinned to its last commit."""
        if self.timestamp_ms is not None:
            return self
        versions = ZarrAtlas(self)._group().attrs.get(VERSIONS_KEY, [])
        return ZarrLocator(self.uri, int(versions[-1][0])) if versions else self  # an empty atlas: nothing to pin

    def atlas(self) -> ZarrAtlas:
        return ZarrAtlas(self)


class ZarrAtlas(Atlas):
    """A zarr atlas; also the streaming loader's cell source (``n_genes``, ``read_rows`` of
    sorted joinids by runs, ``close``)."""

    def __init__(self, locator: ZarrLocator):
        self.locator = locator
        self._g = None
        self._arrays: dict = {}

    # ------------------------------------------------------------------ opening
    def _exists(self) -> bool:
        path = Path(self.uri)
        return path.exists() and not (path.is_dir() and not any(path.iterdir()))

    def _group(self, mode: str = "r"):
        import zarr

        if mode == "r" and self._g is not None:
            return self._g
        path = Path(self.uri)
        if not path.exists():
            raise StoreError(f"no atlas at {self.uri}; run `scpretrain ingest` first (or give the right "
                             "--work-dir / store.uri)")
        if not path.is_dir():
            raise StoreError(f"{self.uri} is a file, not an atlas; give a folder path for the atlas (store.uri)")
        try:
            g = zarr.open_group(self.uri, mode=mode)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise StoreError(f"{self.uri} is not a zarr atlas ({str(e).splitlines()[0][:200]}); give the atlas "
                             "folder `scpretrain ingest` made, or a path that does not exist yet") from None
        if g.attrs.get(FORMAT_KEY) != FORMAT:
            raise StoreError(f"{self.uri} is a zarr group but not an scpretrain atlas (no {FORMAT_KEY}={FORMAT!r} "
                             "attribute); ingest into a new path")
        if mode == "r":
            self._g = g
        return g

    def _array(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = self._group()[name]
        return self._arrays[name]

    def _create(self) -> None:
        import zarr

        path = Path(self.uri)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        path.parent.mkdir(parents=True, exist_ok=True)
        g = zarr.open_group(self.uri, mode="w-")
        g.create_array("X/data", shape=(0,), chunks=(NNZ_CHUNK,), dtype="float32")
        g.create_array("X/indices", shape=(0,), chunks=(NNZ_CHUNK,), dtype="int32")
        g.create_array("X/indptr", shape=(1,), chunks=(CELL_CHUNK,), dtype="int64", fill_value=0)
        for name in _OBS_FIXED:
            g.create_array(f"obs/{name}", shape=(0,), chunks=(CELL_CHUNK,), dtype=str)
        g.attrs.update({FORMAT_KEY: FORMAT, GENE_LIST_KEY: [], VERSIONS_KEY: [], REGISTRY_KEY: "[]"})

    def _version(self) -> tuple[int, int] | None:
        """(datasets, genes) committed at the locator's time; None: the latest."""
        versions = self._group().attrs.get(VERSIONS_KEY, [])
        if self.locator.timestamp_ms is None or not versions:
            return None
        seen = [v for v in versions if int(v[0]) <= self.locator.timestamp_ms]
        return (int(seen[-1][1]), int(seen[-1][2])) if seen else (0, 0)

    # ------------------------------------------------------------------ registry
    def datasets(self) -> list[DatasetRecord]:
        records = [DatasetRecord(**r) for r in json.loads(self._group().attrs.get(REGISTRY_KEY, "[]"))]
        version = self._version()
        return records if version is None else records[: version[0]]

    def genes(self) -> np.ndarray:
        genes = list(self._group().attrs.get(GENE_LIST_KEY, []))
        version = self._version()
        return np.array(genes if version is None else genes[: version[1]], dtype=object)

    def _gene_mask_text(self, name: str) -> str | None:
        if name not in {r.name for r in self.datasets()}:
            return None
        return self._group().attrs.get(GENES_KEY + name)

    def read_meta(self, key: str) -> str | None:
        return self._group("r+").attrs.get(key)  # fresh: another process may have written it

    def write_meta(self, key: str, value: str) -> None:
        self._group("r+").attrs.update({key: value})

    # ------------------------------------------------------------------ reading
    def _read_sorted(self, joinids: np.ndarray) -> sp.csr_matrix:
        from scpretrain_dist.store.sources import runs, stack_runs

        starts, stops = runs(joinids)
        n_genes = self.n_genes
        if starts.size == 0:
            return sp.csr_matrix((0, n_genes), dtype=np.float32)
        data, indices, indptr = self._array("X/data"), self._array("X/indices"), self._array("X/indptr")
        # every row pointer the runs need, in one read: run k owns ptr[at[k] : at[k] + len_k + 1]
        lengths = stops - starts
        at = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
        pos = np.repeat(starts - at, lengths + 1) + np.arange(int((lengths + 1).sum()))
        ptr = indptr.get_coordinate_selection(pos)

        def parts():  # read run by run while the result fills
            for a, b, k in zip(starts.tolist(), stops.tolist(), at.tolist()):
                run_ptr = ptr[k : k + b - a + 1]
                lo, hi = int(run_ptr[0]), int(run_ptr[-1])
                yield run_ptr - lo, indices[lo:hi], data[lo:hi]

        nnz = int(sum(ptr[k + b - a] - ptr[k] for a, b, k in zip(starts.tolist(), stops.tolist(), at.tolist())))
        return stack_runs(parts(), n_genes, nnz_hint=nnz)

    def _read_obs(self, lo: int, hi: int) -> pd.DataFrame:
        return pd.DataFrame({name: np.asarray(self._array(f"obs/{name}")[lo:hi], dtype=object) for name in _OBS_FIXED})

    def close(self) -> None:
        self._g, self._arrays = None, {}

    # ------------------------------------------------------------------ appending
    def _write(self, genes: list[str], n_genes_before: int, n_cells_before: int,
               parts: list[tuple[StreamedDataset, Iterator]], records: Callable[[], list[DatasetRecord]]) -> None:
        g = self._group("r+")
        n_cells = n_cells_before
        nnz = int(g["X/indptr"][n_cells])
        # cut what a failed write left past the committed cells
        for name, size in (("X/data", nnz), ("X/indices", nnz), ("X/indptr", n_cells + 1),
                           *((f"obs/{c}", n_cells) for c in _OBS_FIXED)):
            if g[name].shape[0] != size:
                g[name].resize((size,))
        X_data, X_indices, X_indptr = g["X/data"], g["X/indices"], g["X/indptr"]
        obs = {c: g[f"obs/{c}"] for c in _OBS_FIXED}
        offset = [nnz]

        def write(block) -> None:
            _lo, obs_ids, labels, values = block
            X_data.append(values.data)
            X_indices.append(values.indices.astype(np.int32, copy=False))
            X_indptr.append(values.indptr[1:].astype(np.int64) + offset[0])
            obs["obs_id"].append(obs_ids.astype(str))
            obs["cell_type"].append(labels.astype(str))
            offset[0] += values.nnz

        masks = {}
        for d, blocks in parts:
            pipelined(blocks, write)
            masks[GENES_KEY + d.name] = pack_mask(d.gene_mask)
        done = records()
        versions = list(g.attrs.get(VERSIONS_KEY, []))
        now = max(time.time_ns() // 1_000_000, int(versions[-1][0]) + 1 if versions else 0)
        versions.append([now, len(done), len(genes)])
        # one metadata write: masks, genes, versions and the registry (the commit) together
        g.attrs.update({**masks, GENE_LIST_KEY: list(genes), VERSIONS_KEY: versions,
                        REGISTRY_KEY: json.dumps([asdict(r) for r in done])})
        self.close()

    # ------------------------------------------------------------------ annotation columns
    def obs_columns(self) -> list[str]:
        obs = self._group("r+")["obs"]
        return ["soma_joinid", "obs_id", "dataset_id", "cell_type",
                *sorted(k for k in obs.array_keys() if k not in _OBS_FIXED)]

    def embedding_path(self, name: str) -> str:
        return f"obsm/{name}"

    def add_annotation_columns(self, label: str, confidence: str, embedding: str | None, n_cells: int,
                               dim: int) -> None:
        g = self._group("r+")
        wanted = [(f"obs/{label}", (n_cells,), str, ""), (f"obs/{confidence}", (n_cells,), "float32", np.nan)]
        if embedding:
            wanted.append((self.embedding_path(embedding), (n_cells, dim), "float32", np.nan))
        for name, shape, dtype, fill in wanted:
            if name not in g:
                chunks = (CELL_CHUNK,) if len(shape) == 1 else (max(1, CELL_CHUNK // max(dim, 1)), dim)
                g.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
            elif g[name].shape[0] < n_cells:  # cells ingested since the last annotation
                g[name].resize((n_cells, *shape[1:]))

    def annotated(self, label: str, embedding: str | None, lo: int, n: int) -> np.ndarray:
        g = self._group("r+")
        done = np.zeros(n, dtype=bool)
        if f"obs/{label}" not in g:
            return done
        have = np.asarray(g[f"obs/{label}"][lo : lo + n], dtype=object)
        done[: len(have)] = have != ""
        if embedding:
            name = self.embedding_path(embedding)
            vec = np.zeros(n, dtype=bool)
            if name in g:
                rows = g[name][lo : lo + n]
                vec[: len(rows)] = ~np.isnan(rows).any(axis=1)
            done &= vec
        return done

    def write_annotations(self, lo: int, label: str, labels: np.ndarray, confidence: str, values: np.ndarray,
                          embedding: str | None, vectors: np.ndarray | None) -> None:
        g = self._group("r+")
        hi = lo + len(labels)
        if embedding and vectors is not None:
            g[self.embedding_path(embedding)][lo:hi] = vectors.astype(np.float32)
        g[f"obs/{confidence}"][lo:hi] = np.asarray(values, dtype=np.float32)
        g[f"obs/{label}"][lo:hi] = np.asarray(labels, dtype=object).astype(str)  # the commit, last
