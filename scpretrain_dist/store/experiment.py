"""Any TileDB-SOMA experiment as the atlas, read in place: the CELLxGENE Census, or one written
by ``tiledbsoma.io.from_h5ad``. Nothing is copied and nothing is written into it.

Its columns are named by a mapping (``store.*`` settings): the dataset (``dataset_id``), the
label (``cell_type``), the gene symbols (``feature_name``), the X layer (``raw``) and an obs
``value_filter`` (e.g. ``is_primary_data == True and tissue_general == 'blood'``). The cells
that pass the filter, grouped by dataset, are numbered 0..n-1 (the atlas's joinids); that
numbering, each dataset's measured genes (the Census's ``feature_dataset_presence_matrix`` where
there is one, else the genes with a non-zero value, computed once) and value type are an index
cached in a folder beside the run (``<work_dir>/atlas-index``), never in the experiment. A run pins the experiment's
timestamp. Annotations go to a sidecar SOMA DataFrame per model version (keyed by the
experiment's ``soma_joinid``) and embeddings to a sparse array beside it, under the index; with
``store.annotations = "experiment"`` they are written into the experiment's own obs and obsm
instead (the one write this backend makes there, asked for by the user).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from scpretrain_dist.catalog.values import detect_value_type
from scpretrain_dist.config import StoreConfig
from scpretrain_dist.store.atlas import UNKNOWN_LABEL, Atlas, DatasetRecord, StoreError, pack_mask
from scpretrain_dist.store.files import replaced_whole, write_json_whole

INDEX_VERSION = 1
VALUE_TYPE_SAMPLE = 2000  # cells per dataset whose values decide its value type


@dataclass(frozen=True)
class ExperimentLocator:
    """Picklable pointer to an experiment read in place, pinned to its timestamp, with its
    column mapping (the ``store`` settings: ``dataset_column``, ``label_column``,
    ``gene_column``, ``measurement``, ``layer``, ``value_filter``, ``value_type``) and the folder
    its index is cached in."""

    uri: str
    timestamp_ms: int | None
    mapping: StoreConfig
    index_dir: str

    def open(self):
        import tiledbsoma as soma

        try:
            return soma.Experiment.open(self.uri, tiledb_timestamp=self.timestamp_ms)
        except soma.SOMAError as e:
            if "://" not in self.uri and not Path(self.uri).exists():
                raise StoreError(f"no SOMA experiment at {self.uri} (store.uri); give the experiment's folder or URI") from None
            raise StoreError(f"{self.uri} is not a SOMA experiment ({str(e).splitlines()[0][:200]})") from None

    def pinned(self) -> ExperimentLocator:
        """Pinned to the version its index was made from (made now if there is none)."""
        return self if self.timestamp_ms is not None else ExperimentAtlas(self).locator

    def atlas(self) -> ExperimentAtlas:
        return ExperimentAtlas(self)

    @property
    def key(self) -> str:
        """Names the index of this experiment under this mapping; the index holds the version
        it was made from, which every run on it then reads (remove the folder to index anew)."""
        blob = json.dumps({"uri": self.uri, "mapping": _mapping(self.mapping), "v": INDEX_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _mapping(store: StoreConfig) -> dict:
    """The settings that choose and name the cells (not where the atlas is, nor its backend)."""
    return {k: v for k, v in asdict(store).items() if k not in ("uri", "backend", "annotations")}


def _presence_masks(exp, locator: ExperimentLocator, names: list[str], n_genes: int) -> dict[str, np.ndarray] | None:
    """Each dataset's measured genes from a Census ``feature_dataset_presence_matrix`` (rows:
    the ``census_info/datasets`` table beside the experiment); None where there is none."""
    import tiledbsoma as soma

    ms = exp.ms[locator.mapping.measurement]
    if "feature_dataset_presence_matrix" not in ms:
        return None
    info = Path(locator.uri).parent.parent / "census_info" / "datasets"
    if not info.exists():
        return None
    with soma.DataFrame.open(str(info)) as df:
        table = df.read(column_names=["soma_joinid", "dataset_id"]).concat().to_pandas()
    row_of = dict(zip(table["dataset_id"], table["soma_joinid"]))
    if not set(names) <= set(row_of):
        return None
    coo = ms["feature_dataset_presence_matrix"].read().tables().concat()
    rows, cols = coo["soma_dim_0"].to_numpy(), coo["soma_dim_1"].to_numpy()
    masks = {}
    for name in names:
        mask = np.zeros(n_genes, dtype=bool)
        mask[cols[rows == row_of[name]]] = True
        masks[name] = mask
    return masks


class ExperimentAtlas(Atlas):
    """An experiment read in place through its cached index."""

    def __init__(self, locator: ExperimentLocator):
        self.locator = locator
        self._index: dict | None = None
        self._X = None
        self._exp = None
        index = self._load()
        if locator.timestamp_ms is None:  # every read sees the version the index was made from
            self.locator = replace(locator, timestamp_ms=index["timestamp_ms"])

    # ------------------------------------------------------------------ the index
    @property
    def _dir(self) -> Path:
        return Path(self.locator.index_dir) / self.locator.key

    def _load(self) -> dict:
        if self._index is None:
            path = self._dir / "index.json"
            if not path.exists():
                self._build()
            meta = json.loads(path.read_text())
            arrays = np.load(self._dir / "index.npz")
            self._index = {"records": [DatasetRecord(**r) for r in meta["records"]], "genes": meta["genes"],
                           "joinids": arrays["joinids"], "masks": arrays["masks"], "timestamp_ms": meta["timestamp_ms"]}
        return self._index

    def _build(self) -> None:
        """Which cells pass the filter, by dataset; genes; each dataset's genes and value type."""
        m = self.locator.mapping
        with self.locator.open() as now:
            version = replace(self.locator, timestamp_ms=int(now.tiledb_timestamp_ms))
        with version.open() as exp:
            if m.measurement not in exp.ms:
                raise StoreError(f"{self.uri} has no measurement {m.measurement!r} (store.measurement); it has "
                                 f"{', '.join(exp.ms.keys())}")
            ms = exp.ms[m.measurement]
            if "X" not in ms or m.layer not in ms.X:
                layers = ", ".join(ms.X.keys()) if "X" in ms else "none"
                raise StoreError(f"{self.uri} has no X layer {m.layer!r} (store.layer); its layers: {layers}")
            obs_names = exp.obs.schema.names
            for what, col in (("store.dataset_column", m.dataset_column), ("store.label_column", m.label_column)):
                if col not in obs_names:
                    raise StoreError(f"obs of {self.uri} has no column {col!r} ({what}); it has: {', '.join(obs_names)}")
            if m.gene_column not in ms.var.schema.names:
                raise StoreError(f"var of {self.uri} has no column {m.gene_column!r} (store.gene_column); it has: "
                                 f"{', '.join(ms.var.schema.names)}")
            try:
                obs = exp.obs.read(column_names=["soma_joinid", m.dataset_column, m.label_column],
                                   value_filter=m.value_filter or None).concat().to_pandas()
            except Exception as e:  # a filter naming a missing column or of bad syntax
                raise StoreError(f"store.value_filter {m.value_filter!r} cannot be applied to obs of {self.uri}: "
                                 f"{str(e).splitlines()[0][:300]}") from None
            if obs.empty:
                raise StoreError(f"no cell of {self.uri} passes store.value_filter {m.value_filter!r}")
            var = ms.var.read(column_names=["soma_joinid", m.gene_column]).concat().to_pandas().sort_values("soma_joinid")
            n_genes = int(var["soma_joinid"].max()) + 1
            genes = np.array([""] * n_genes, dtype=object)
            genes[var["soma_joinid"].to_numpy()] = var[m.gene_column].astype(str).str.upper().to_numpy()
            dup = pd.Series(genes).duplicated(keep=False)
            if dup.any():
                raise StoreError(f"var[{m.gene_column!r}] of {self.uri} names genes more than once after upper-casing "
                                 f"(e.g. {', '.join(sorted(set(genes[dup.to_numpy()]))[:3])}); give a column of unique "
                                 "symbols (store.gene_column)")
            obs[m.dataset_column] = obs[m.dataset_column].astype(str)
            obs = obs.sort_values([m.dataset_column, "soma_joinid"], kind="stable")
            names = [str(n) for n in pd.unique(obs[m.dataset_column])]
            presence = _presence_masks(exp, version, names, n_genes)
            X = ms.X[m.layer]
            records, masks, start = [], [], 0
            for name, rows in obs.groupby(m.dataset_column, sort=False):  # one pass, in the sorted order
                joinids = rows["soma_joinid"].to_numpy(dtype=np.int64)
                if presence is not None:
                    mask = presence[name]
                else:  # the genes with any non-zero value (one pass over the dataset's values)
                    mask = np.zeros(n_genes, dtype=bool)
                    for lo in range(0, len(joinids), 65536):
                        part = X.read(coords=(joinids[lo : lo + 65536],)).tables().concat()
                        mask[np.unique(part["soma_dim_1"].to_numpy())] = True
                sample = X.read(coords=(joinids[:VALUE_TYPE_SAMPLE],)).tables().concat()
                value_type = m.value_type if m.value_type != "auto" else detect_value_type(
                    sample["soma_data"].to_numpy())
                labels = rows[m.label_column].astype(str)
                records.append(DatasetRecord(
                    name=name, joinid_start=start, n_cells=len(joinids), n_genes=int(mask.sum()),
                    value_type=value_type, species="unknown", tissue="unknown", technology="unknown",
                    label_key=m.label_column, n_types=int(labels[~labels.isin([UNKNOWN_LABEL, "nan", ""])].nunique()),
                    source=self.uri, sha256="", ingested_at=""))
                masks.append(mask)
                start += len(joinids)
        # written only once every check passed; two processes indexing at once write the same
        # files, each whole (the arrays first, the JSON last: the index exists once it does)
        self._dir.mkdir(parents=True, exist_ok=True)
        with replaced_whole(self._dir / "index.npz") as fh:
            np.savez(fh, joinids=obs["soma_joinid"].to_numpy(dtype=np.int64), masks=np.array(masks))
        write_json_whole(self._dir / "index.json", {"uri": self.uri, "timestamp_ms": version.timestamp_ms,
                                                    "mapping": _mapping(self.locator.mapping), "genes": genes.tolist(),
                                                    "records": [asdict(r) for r in records]})

    # ------------------------------------------------------------------ the protocol
    def _exists(self) -> bool:
        return True

    def _create(self) -> None:
        raise StoreError(f"{self.uri} is read in place (store.backend = \"experiment\"); it is never written")

    def _write(self, genes, n_genes_before, n_cells_before, parts, records) -> None:
        raise self._read_only()

    def ingest(self, entries, log=print):
        raise self._read_only()  # before any input is read

    def append_streamed(self, genes, datasets, log=print):
        raise self._read_only()

    def _read_only(self) -> StoreError:
        return StoreError(f"cannot ingest into {self.uri}: an experiment read in place (store.backend = "
                          "\"experiment\") is never written. Ingest into an atlas of your own (another store.uri, "
                          "store.backend = \"soma\" or \"zarr\")")

    def datasets(self) -> list[DatasetRecord]:
        return list(self._load()["records"])

    def genes(self) -> np.ndarray:
        return np.array(self._load()["genes"], dtype=object)

    def _gene_mask_text(self, name: str) -> str | None:
        index = self._load()
        names = [r.name for r in index["records"]]
        return pack_mask(index["masks"][names.index(name)]) if name in names else None

    def soma_joinids(self, positions: np.ndarray) -> np.ndarray:
        """The experiment's soma_joinids of atlas cells."""
        return self._load()["joinids"][np.asarray(positions, dtype=np.int64)]

    def _array(self):
        if self._X is None:
            m = self.locator.mapping
            self._exp = self.locator.open()
            self._X = self._exp.ms[m.measurement].X[m.layer]
        return self._X

    def _read_sorted(self, joinids: np.ndarray) -> sp.csr_matrix:
        from scpretrain_dist.store.soma import read_rows_by_joinid

        sj = self.soma_joinids(joinids)
        order = np.argsort(sj, kind="stable")
        mat = read_rows_by_joinid(self._array(), sj[order], self.n_genes)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return mat[inverse].tocsr()

    def _read_obs(self, lo: int, hi: int) -> pd.DataFrame:
        m = self.locator.mapping
        sj = self.soma_joinids(np.arange(lo, hi))
        with self.locator.open() as exp:
            named = "obs_id" in exp.obs.schema.names  # from_h5ad's cell names; the Census has none
            columns = ["soma_joinid", m.label_column, *(["obs_id"] if named else [])]
            tbl = exp.obs.read(coords=(np.sort(sj),), column_names=columns).concat().to_pandas()
        tbl = tbl.set_index("soma_joinid").loc[sj]
        ids = tbl["obs_id"].astype(str).to_numpy() if named else np.array([str(s) for s in sj], dtype=object)
        return pd.DataFrame({"obs_id": ids, "cell_type": tbl[m.label_column].astype(str).to_numpy()})

    def close(self) -> None:
        if self._exp is not None:
            self._exp.close()
        self._exp = self._X = None

    def __getstate__(self):
        raise TypeError("an ExperimentAtlas holds open arrays; pass its locator between processes")

    # ------------------------------------------------------------------ metadata and annotations (sidecar)
    @property
    def _sidecar(self) -> Path:
        return Path(self.locator.index_dir) / "annotations"

    def annotation_lock(self) -> Path:
        return self._sidecar.parent / "annotate.lock"

    def read_meta(self, key: str) -> str | None:
        path = self._sidecar / f"{key}.json"
        return path.read_text() if path.exists() else None

    def write_meta(self, key: str, value: str) -> None:
        self._sidecar.mkdir(parents=True, exist_ok=True)
        write_json_whole(self._sidecar / f"{key}.json", json.loads(value))

    def _frame(self, label: str) -> str:
        return str(self._sidecar / label.rsplit("__", 1)[0])

    @property
    def _write_back(self) -> bool:
        return self.locator.mapping.annotations == "experiment"

    def obs_columns(self) -> list[str]:
        if self._write_back:
            import tiledbsoma as soma

            with soma.Experiment.open(self.locator.uri) as exp:  # now, not at the pinned version
                return list(exp.obs.schema.names)
        cols = ["soma_joinid", "obs_id", "dataset_id", "cell_type"]
        if self._sidecar.exists():
            for d in sorted(self._sidecar.iterdir()):
                if d.is_dir() and (d / "obs").exists():
                    cols += [f"{d.name}__label", f"{d.name}__confidence"]
        return cols

    def embedding_path(self, name: str) -> str:
        if self._write_back:
            return f"{self.locator.uri}/ms/{self.locator.mapping.measurement}/obsm/{name}"
        return str(self._sidecar / name / "embedding")

    def _n_rows(self) -> int:
        return int(self._load()["joinids"].max()) + 1

    def add_annotation_columns(self, label: str, confidence: str, embedding: str | None, n_cells: int,
                               dim: int) -> None:
        import tiledbsoma as soma

        if self._write_back:
            from scpretrain_dist.store.soma import add_obs_annotation_columns

            self._check_writable()
            add_obs_annotation_columns(self.locator.uri, self.locator.mapping.measurement, label, confidence,
                                       embedding, self._n_rows() if n_cells else 1, dim)
            return
        root = Path(self._frame(label))
        n = self._n_rows() if n_cells else 1
        if not (root / "obs").exists():
            root.mkdir(parents=True, exist_ok=True)
            soma.DataFrame.create(str(root / "obs"), schema=pa.schema(
                [("soma_joinid", pa.int64()), ("label", pa.large_string()), ("confidence", pa.float32())]),
                domain=[[0, n - 1]]).close()
        if embedding and not (root / "embedding").exists():
            soma.SparseNDArray.create(str(root / "embedding"), type=pa.float32(), shape=(n, max(dim, 1))).close()

    def _check_writable(self) -> None:
        import os

        uri = self.locator.uri
        obs = Path(uri) / "obs"
        if "://" not in uri and not (os.access(uri, os.W_OK) and os.access(obs, os.W_OK)):
            raise StoreError(f"store.annotations = \"experiment\" writes into {uri}, which this user cannot write; "
                             "ask for write access, or leave store.annotations at \"sidecar\" (the default)")

    def annotated(self, label: str, embedding: str | None, lo: int, n: int) -> np.ndarray:
        from scpretrain_dist.store.soma import obs_rows_annotated

        sj = self.soma_joinids(np.arange(lo, lo + n))
        if self._write_back:
            return obs_rows_annotated(f"{self.locator.uri}/obs", label, embedding and self.embedding_path(embedding), sj)
        root = Path(self._frame(label))
        return obs_rows_annotated(str(root / "obs"), "label", embedding and str(root / "embedding"), sj)

    def write_annotations(self, lo: int, label: str, labels: np.ndarray, confidence: str, values: np.ndarray,
                          embedding: str | None, vectors: np.ndarray | None) -> None:
        import tiledbsoma as soma

        if self._write_back:
            from scpretrain_dist.store.soma import write_obs_annotations

            write_obs_annotations(self.locator.uri, self.locator.mapping.measurement,
                                  self.soma_joinids(np.arange(lo, lo + len(labels))), label, labels, confidence,
                                  values, embedding, vectors)
            return
        root = Path(self._frame(label))
        sj = self.soma_joinids(np.arange(lo, lo + len(labels)))
        if embedding and vectors is not None:
            dim = vectors.shape[1]
            with soma.SparseNDArray.open(str(root / "embedding"), "w") as A:
                A.write(pa.Table.from_pydict({
                    "soma_dim_0": np.repeat(sj, dim), "soma_dim_1": np.tile(np.arange(dim, dtype=np.int64), len(sj)),
                    "soma_data": vectors.astype(np.float32).ravel()}))
        with soma.DataFrame.open(str(root / "obs"), "w") as df:  # the commit: the label, last
            df.write(pa.table({"soma_joinid": sj, "label": pa.array(np.asarray(labels, dtype=object).tolist(),
                                                                      pa.large_string()),
                               "confidence": pa.array(np.asarray(values, dtype=np.float32), pa.float32())}))
