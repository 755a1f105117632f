"""The bad-input corpus: every command given inputs a user gets wrong, generated here.

Each case runs the real CLI (``scpretrain_dist.cli.main``, in this process) against a real SOMA
atlas, a real MLflow registry (sqlite) and real files, and asserts the exit code, a message that
names the input, and that the atlas, the registry and the user's files are byte for byte (and
mode for mode) what they were. A few cases are inputs that are right but surprising: they must
succeed and say so.
"""

from __future__ import annotations

import json
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytestmark = pytest.mark.slow
MODEL = "corpus"


def write_h5ad(path: Path, X, genes, labels=None, var=None, obs_names=None, dtype=np.float32) -> Path:
    import anndata as ad

    n = X.shape[0]
    obs = pd.DataFrame(index=[str(o) for o in (obs_names if obs_names is not None else
                                                [f"c{i}" for i in range(n)])])
    if labels is not None:
        obs["cell_type"] = list(labels)
    v = pd.DataFrame(index=[str(g) for g in genes]) if var is None else var
    X = X.astype(dtype) if not sp.issparse(X) else X.astype(dtype)
    ad.AnnData(X=X, obs=obs, var=v).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A work dir with a demo atlas and a registered annotator, plus good files to spoil."""
    import mlflow

    from scpretrain_dist import recipes
    from scpretrain_dist.catalog import load_catalog
    from scpretrain_dist.config import DemoDataConfig
    from scpretrain_dist.demo import write_demo_atlas
    from scpretrain_dist.evaluate.protocols import load_target
    from scpretrain_dist.serve.pyfunc import register_annotator
    from scpretrain_dist.store import open_atlas
    from scpretrain_dist.tracking.mlflow_runs import setup
    from scpretrain_dist.train.finetune import finetune

    work = tmp_path_factory.mktemp("corpus") / "work"
    cfg = recipes.configure("tiny", overrides=["finetune.max_epochs=10", "finetune.patience=3"], work_dir=str(work))
    demo = work.parent / "demo"
    write_demo_atlas(demo, DemoDataConfig(n_datasets=3, cells_per_dataset=120, n_genes=120, n_types=3,
                                          markers_per_type=10, seed=5))
    store = open_atlas(cfg.store_uri)
    store.ingest(load_catalog(demo / "catalog.toml"), log=lambda m: None)
    target = load_target(store, "demo_00")
    setup(cfg)
    res = finetune(target.X[:80], target.labels[:80], target.X[80:], target.labels[80:],
                   len(target.classes), cfg.finetune, cfg.model, 0)
    example = pd.DataFrame(np.expm1(target.X[:2].toarray()).round(0), columns=target.genes)
    with mlflow.start_run():
        register_annotator(res.model, target.genes, target.classes, example, {"finetune_dataset": "demo_00"}, MODEL,
                      "champion")
    genes = list(store.genes())
    counts = np.random.default_rng(0).poisson(2.0, (40, len(genes))).astype(np.float32)
    counts[:, 0] += 1
    files = work.parent / "files"
    files.mkdir()
    good = write_h5ad(files / "good.h5ad", sp.csr_matrix(counts), genes, labels=["a", "b"] * 20)
    return {"work": work, "cfg": cfg, "demo": demo, "files": files, "genes": genes, "counts": counts, "good": good}


@dataclass
class Case:
    """One command line; ``make(env, folder)`` writes the inputs it needs and returns the
    arguments (``{work}`` stands for the work dir) and the paths that must stay as they were."""

    make: object
    code: int = 2
    says: tuple[str, ...] = ()
    also_unchanged: tuple[str, ...] = field(default=())


def _bad_h5ad(kind: str):
    def make(env, d):
        genes, counts = env["genes"], env["counts"].copy()
        X: object = sp.csr_matrix(counts)
        kw: dict = {}
        g = genes
        if kind == "nan":
            counts[3, 4] = np.nan
            X = counts
        elif kind == "inf":
            counts[3, 4] = np.inf
            X = counts
        elif kind == "beyond_float32":
            X, kw = counts.astype(np.float64), {"dtype": np.float64}
            X[5, 5] = 1e39
        elif kind == "negative":
            counts[0, 1] = -2
            X = counts
        elif kind == "zero_cells":
            X = np.zeros((0, len(genes)), np.float32)
        elif kind == "one_cell":
            X = counts[:1]
        elif kind == "all_zero":
            X = np.zeros_like(counts)
        elif kind == "no_overlap":
            g = [f"RANDOM{i}" for i in range(len(genes))]
        elif kind == "ensembl":
            g = [f"ENSG{i:011d}" for i in range(len(genes))]
        elif kind == "ensembl_with_symbols":
            g = [f"ENSG{i:011d}" for i in range(len(genes))]
            kw["var"] = pd.DataFrame({"feature_name": genes}, index=g)
        elif kind == "empty_gene_name":
            g = ["", *genes[1:]]
        path = write_h5ad(d / f"{kind}.h5ad", X, g, **kw)
        return ["ingest", str(path), "--work-dir", "{work}"], [path]
    return make


def _raw_file(name: str, content: bytes):
    def make(env, d):
        path = d / name
        path.write_bytes(content)
        return ["ingest", str(path), "--work-dir", "{work}"], [path]
    return make


def _truncated(env, d):
    path = d / "truncated.h5ad"
    data = env["good"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return ["ingest", str(path), "--work-dir", "{work}"], [path]


def _same_content_other_name(env, d):
    path = d / "again_demo_00.h5ad"
    shutil.copy(env["demo"] / "demo_00.h5ad", path)
    return ["ingest", str(path), "--work-dir", "{work}"], [path]


def _catalog(text: str, with_good: bool = True):
    def make(env, d):
        if with_good:
            shutil.copy(env["good"], d / "good.h5ad")
        path = d / "catalog.toml"
        path.write_text(text)
        return ["ingest", "--catalog", str(path), "--work-dir", "{work}"], [path]
    return make


def _declared(value_type: str, values: str):
    def make(env, d):
        counts = env["counts"]
        X = np.log1p(counts) if values == "log" else counts
        write_h5ad(d / "good.h5ad", sp.csr_matrix(X), env["genes"])
        path = d / "catalog.toml"
        path.write_text(f'[[dataset]]\nname = "declared"\npath = "good.h5ad"\nvalue_type = "{value_type}"\n')
        return ["ingest", "--catalog", str(path), "--work-dir", "{work}"], [path, d / "good.h5ad"]
    return make


def _named_file(name: str):
    def make(env, d):
        path = d / name
        shutil.copy(env["good"], path)
        return ["ingest", str(path), "--work-dir", "{work}"], [path]
    return make


def _store_not_soma(env, d):
    (d / "notsoma").mkdir()
    (d / "notsoma" / "README").write_text("my notes")
    return ["ingest", str(env["good"]), "--work-dir", "{work}", "--set", f'store.uri="{d / "notsoma"}"'], [d / "notsoma"]


def _store_not_zarr(env, d):
    (d / "notes.zarr").mkdir()
    (d / "notes.zarr" / "README").write_text("my notes")
    return ["ingest", str(env["good"]), "--work-dir", "{work}", "--set", f'store.uri="{d / "notes.zarr"}"'], [d / "notes.zarr"]


def _soma_atlas_read_as_zarr(env, d):
    # the work dir's SOMA atlas, named as a zarr one
    return (["pretrain", "--work-dir", "{work}", "--set", "store.backend=zarr",
             "--set", 'store.uri="{work}/atlas.soma"'], [])


def _store_is_file(env, d):
    (d / "atlas_file").write_text("x")
    return (["evaluate", "--targets", "demo_00", "--work-dir", "{work}", "--set", f'store.uri="{d / "atlas_file"}"'],
            [d / "atlas_file"])


def _args(*args: str, files=None):
    def make(env, d):
        made = files(env, d) if files else {}
        return [a.format(work="{work}", **{k: str(v) for k, v in made.items()}) for a in args], list(made.values())
    return make


def _pretrain_result(content: str | None):
    def files(env, d):
        path = d / "result.json"
        if content is not None:
            path.write_text(content)
        return {"result": path}
    return files


def _mapping(content: str):
    def files(env, d):
        path = d / "mapping.json"
        path.write_text(content)
        return {"mapping": path}
    return files


def _h5ad_for_annotate(kind: str):
    def files(env, d):
        counts = env["counts"].copy()
        dtype = np.float32
        genes = env["genes"]
        if kind == "beyond_float32":
            counts = counts.astype(np.float64)
            counts[7, 3] = 5e38
            dtype = np.float64
        elif kind == "nan":
            counts[1, 1] = np.nan
        elif kind == "no_overlap":
            genes = [f"RANDOM{i}" for i in range(len(genes))]
        path = write_h5ad(d / f"query_{kind}.h5ad", counts, genes, dtype=dtype)
        out = {"query": path}
        if kind == "read_only":
            path.chmod(0o444)
        if kind == "out_exists":
            out["out"] = d / "taken.h5ad"
            out["out"].write_text("mine")
        return out
    return files


ANNOTATE = ("annotate", "--model", f"models:/{MODEL}@champion", "--workers", "0", "--work-dir", "{work}")

CASES: dict[str, Case] = {
    # ---- ingest: the file's values and genes
    "ingest_nan": Case(_bad_h5ad("nan"), says=("nan.h5ad", "NaN")),
    "ingest_inf": Case(_bad_h5ad("inf"), says=("inf.h5ad", "infinite")),
    "ingest_beyond_float32": Case(_bad_h5ad("beyond_float32"), says=("beyond_float32.h5ad", "float32")),
    "ingest_negative": Case(_bad_h5ad("negative"), says=("negative.h5ad", "negative")),
    "ingest_zero_cells": Case(_bad_h5ad("zero_cells"), says=("zero_cells.h5ad", "0 cells")),
    "ingest_one_cell": Case(_bad_h5ad("one_cell"), says=("one_cell.h5ad", "single cell")),
    "ingest_all_zero": Case(_bad_h5ad("all_zero"), says=("all_zero.h5ad", "every value of X is 0")),
    "ingest_no_gene_overlap": Case(_bad_h5ad("no_overlap"), says=("no_overlap.h5ad", "shares 0 of its")),
    "ingest_ensembl_ids": Case(_bad_h5ad("ensembl"), says=("ensembl.h5ad", "Ensembl ids", "symbols")),
    "ingest_ensembl_ids_with_symbol_column": Case(_bad_h5ad("ensembl_with_symbols"),
                                                  says=("Ensembl ids", 'gene_key = "feature_name"')),
    "ingest_empty_gene_name": Case(_bad_h5ad("empty_gene_name"), says=("empty_gene_name.h5ad", "empty")),
    "ingest_not_hdf5": Case(_raw_file("text.h5ad", b"cell,A,B\nc1,1,2\n"), says=("text.h5ad", "not an HDF5 file")),
    "ingest_empty_file": Case(_raw_file("empty.h5ad", b""), says=("empty.h5ad", "is empty")),
    "ingest_truncated": Case(_truncated, says=("truncated.h5ad", "not a readable .h5ad")),
    "ingest_not_h5ad_suffix": Case(_named_file("cells.csv"), says=("cells.csv", "not an .h5ad file")),
    "ingest_missing_file": Case(_args("ingest", "{work}/../nowhere.h5ad", "--work-dir", "{work}"),
                                says=("nowhere.h5ad", "does not exist")),
    "ingest_same_content_other_name": Case(_same_content_other_name,
                                           says=("again_demo_00", "same content as dataset 'demo_00'")),
    "ingest_unicode_dataset_name": Case(_named_file("données.h5ad"), says=("'données'", "catalog")),
    "ingest_declared_counts_are_log_values": Case(_declared("counts", "log"), says=("declared", "lognorm")),
    "ingest_declared_log_values_are_counts": Case(_declared("lognorm", "counts"), says=("declared", "counts")),
    # ---- ingest: catalogs
    "catalog_not_toml": Case(_catalog("[[dataset]\nname = "), says=("catalog", "not valid TOML")),
    "catalog_no_datasets": Case(_catalog("[defaults]\nspecies = 'human'\n"), says=("catalog", "no [[dataset]]")),
    "catalog_unknown_key": Case(_catalog('[[dataset]]\nname = "x"\npath = "good.h5ad"\nlabel = "cell_type"\n'),
                                says=("unknown key", "'label'", "label_key")),
    "catalog_wrong_type": Case(_catalog('[[dataset]]\nname = "x"\npath = "good.h5ad"\nspecies = 3\n'),
                               says=("species = 3", "string")),
    "catalog_duplicate_names": Case(_catalog('[[dataset]]\nname = "x"\npath = "good.h5ad"\n'
                                             '[[dataset]]\nname = "x"\npath = "good.h5ad"\n'), says=("'x'", "more than once")),
    "catalog_path_like_name": Case(_catalog('[[dataset]]\nname = "../x"\npath = "good.h5ad"\n'),
                                   says=("'../x'", "letters, digits")),
    "catalog_label_key_names_no_column": Case(_catalog('[[dataset]]\nname = "x"\npath = "good.h5ad"\n'
                                                       'label_key = "celltype"\n'),
                                              says=("label_key 'celltype'", "cell_type")),
    "catalog_missing_root": Case(_catalog('[defaults]\nroot = "no/such/folder"\n[[dataset]]\nname = "x"\n'
                                          'path = "good.h5ad"\n'), says=("no/such/folder", "does not exist")),
    # ---- stores
    "store_not_soma": Case(_store_not_soma, says=("notsoma", "not a SOMA experiment")),
    "store_is_a_file": Case(_store_is_file, says=("atlas_file",)),
    "store_not_zarr": Case(_store_not_zarr, says=("notes.zarr", "not a zarr atlas")),
    "store_soma_read_as_zarr": Case(_soma_atlas_read_as_zarr, says=("atlas.soma", "not a zarr atlas")),
    "store_backend_unknown": Case(_args("pretrain", "--set", 'store.backend="hdf5"', "--work-dir", "{work}"),
                                  says=("store.backend", "hdf5", "zarr")),
    # ---- settings and numbers on the command line
    "budgets_negative": Case(_args("evaluate", "--budgets", "-5", "--work-dir", "{work}"), says=("--budgets", "-5")),
    "budgets_zero": Case(_args("evaluate", "--budgets", "0", "--work-dir", "{work}"), says=("--budgets", ">= 1")),
    "epochs_negative": Case(_args("pretrain", "--set", "pretrain.epochs=-1", "--work-dir", "{work}"),
                            says=("pretrain.epochs", ">= 1")),
    "batch_size_zero": Case(_args("pretrain", "--set", "pretrain.batch_size=0", "--work-dir", "{work}"),
                            says=("pretrain.batch_size", ">= 1")),
    "lr_nan": Case(_args("pretrain", "--set", "pretrain.lr=nan", "--work-dir", "{work}"), says=("pretrain.lr", "finite")),
    "epochs_not_a_number": Case(_args("pretrain", "--set", "pretrain.epochs=many", "--work-dir", "{work}"),
                                says=("pretrain.epochs", "expected int")),
    "unknown_setting": Case(_args("pretrain", "--set", "pretrain.epoch=3", "--work-dir", "{work}"),
                            says=("pretrain.epoch", "valid keys")),
    "unknown_loader": Case(_args("pretrain", "--set", 'pretrain.loader="disk"', "--work-dir", "{work}"),
                           says=("pretrain.loader", "memory, stream")),
    "fractions_leave_no_test_cells": Case(_args("evaluate", "--set", "finetune.train_frac=0.95", "--work-dir", "{work}"),
                                          says=("finetune.train_frac", "no test cells")),
    "reserved_alias": Case(_args("evaluate", "--set", 'tracking.alias="latest"', "--work-dir", "{work}"),
                           says=("tracking.alias", "latest")),
    "unknown_method": Case(_args("evaluate", "--methods", "scpretrain", "magic", "--work-dir", "{work}"),
                           says=("magic", "unknown method")),
    "unknown_recipe": Case(_args("pretrain", "--recipe", "huge", "--work-dir", "{work}"), says=("huge", "tiny")),
    "folds_zero": Case(_args("evaluate", "--folds", "0", "--work-dir", "{work}"), says=("evaluate.folds", "'0'")),
    "settings_file_missing": Case(_args("pretrain", "--config", "{work}/none.toml", "--work-dir", "{work}"),
                                  says=("none.toml", "does not exist")),
    "block_size_negative": Case(_args(*ANNOTATE, "--h5ad", "{query}", "--block-size", "-1",
                                      files=_h5ad_for_annotate("plain")), says=("--block-size", "-1")),
    "workers_negative": Case(_args(*ANNOTATE, "--h5ad", "{query}", "--workers", "-1", files=_h5ad_for_annotate("plain")),
                             says=("--workers", "-1")),
    "serve_unknown_model": Case(_args("serve", "--model", "models:/nope@champion", "--work-dir", "{work}"),
                                says=("models:/nope@champion", "not in the registry")),
    "port_out_of_range": Case(_args("serve", "--port", "70000", "--work-dir", "{work}"), says=("--port", "65535")),
    # ---- pipeline inputs, refused before any pretraining
    "unknown_target": Case(_args("evaluate", "--targets", "demo_09", "--work-dir", "{work}"),
                           says=("demo_09", "not in the atlas", "demo_00")),
    "exclude_everything": Case(_args("pretrain", "--exclude", "demo_00", "demo_01", "demo_02", "--work-dir", "{work}"),
                               says=("every dataset", "excluded")),
    "exclude_unknown": Case(_args("pretrain", "--exclude", "demo_7", "--work-dir", "{work}"), says=("demo_7",)),
    "pretrain_result_missing": Case(_args("finetune", "--target", "demo_00", "--pretrain-result", "{result}",
                                          "--work-dir", "{work}", files=_pretrain_result(None)),
                                    says=("result.json", "does not exist")),
    "pretrain_result_malformed": Case(_args("finetune", "--target", "demo_00", "--pretrain-result", "{result}",
                                            "--work-dir", "{work}", files=_pretrain_result("{not json")),
                                      says=("result.json", "not a pretraining result")),
    "pretrain_result_wrong_shape": Case(_args("finetune", "--target", "demo_00", "--pretrain-result", "{result}",
                                              "--work-dir", "{work}", files=_pretrain_result('{"encoder": 1}')),
                                        says=("result.json", "not a pretraining result")),
    "mapping_misses_a_label": Case(_args("evaluate", "--protocol", "transfer", "--references", "demo_00", "--queries",
                                         "demo_01", "--label-mapping", "{mapping}", "--work-dir", "{work}",
                                         files=_mapping('{"demo_00": {"type_A": "A"}, "demo_01": {"type_A": "A"}}')),
                                   says=("demo_00", "does not cover labels", "type_B")),
    "mapping_not_json": Case(_args("evaluate", "--protocol", "transfer", "--references", "demo_00", "--queries",
                                   "demo_01", "--label-mapping", "{mapping}", "--work-dir", "{work}",
                                   files=_mapping("demo_00: A")), says=("mapping.json", "not valid JSON")),
    "reference_is_query": Case(_args("evaluate", "--protocol", "transfer", "--references", "demo_00", "--queries",
                                     "demo_00", "--work-dir", "{work}"), says=("demo_00", "both reference and query")),
    # ---- annotation and models
    "unknown_model": Case(_args("annotate", "--model", "models:/nope@champion", "--h5ad", "{query}", "--work-dir",
                                "{work}", files=_h5ad_for_annotate("plain")), says=("models:/nope@champion", MODEL)),
    "malformed_model_uri": Case(_args("annotate", "--model", "runs:/123/model", "--h5ad", "{query}", "--work-dir",
                                      "{work}", files=_h5ad_for_annotate("plain")), says=("runs:/123/model", "NAME@ALIAS")),
    "annotate_beyond_float32": Case(_args(*ANNOTATE, "--h5ad", "{query}", files=_h5ad_for_annotate("beyond_float32")),
                                    says=("query_beyond_float32.h5ad", "float32")),
    "annotate_nan": Case(_args(*ANNOTATE, "--h5ad", "{query}", files=_h5ad_for_annotate("nan")),
                         says=("query_nan.h5ad", "NaN")),
    "annotate_no_gene_overlap": Case(_args(*ANNOTATE, "--h5ad", "{query}", files=_h5ad_for_annotate("no_overlap")),
                                     says=("query_no_overlap.h5ad", "of the model's")),
    "annotate_read_only_in_place": Case(_args(*ANNOTATE, "--h5ad", "{query}", "--in-place",
                                              files=_h5ad_for_annotate("read_only")), says=("read-only", "--in-place")),
    "annotate_out_exists": Case(_args(*ANNOTATE, "--h5ad", "{query}", "--out", "{out}",
                                      files=_h5ad_for_annotate("out_exists")), says=("taken.h5ad", "already exists")),
    "annotate_out_is_input": Case(_args(*ANNOTATE, "--h5ad", "{query}", "--out", "{query}",
                                        files=_h5ad_for_annotate("plain")), says=("is the input", "--in-place")),
    "annotate_out_and_in_place": Case(_args(*ANNOTATE, "--h5ad", "{query}", "--out", "{query}.x", "--in-place",
                                            files=_h5ad_for_annotate("plain")), says=("--out", "--in-place")),
    "annotate_missing_h5ad": Case(_args(*ANNOTATE, "--h5ad", "{work}/../none.h5ad"), says=("none.h5ad", "does not exist")),
    "annotate_unknown_dataset": Case(_args(*ANNOTATE[:-2], "--store-uri", "{work}/atlas.soma", "--datasets", "demo_5",
                                           "--work-dir", "{work}"), says=("demo_5", "not in the atlas")),
    "markers_not_h5ad": Case(_args("markers", "--model", f"models:/{MODEL}@champion", "--h5ad", "{mapping}",
                                   "--work-dir", "{work}", files=_mapping("{}")), says=("mapping.json", "not an HDF5")),
}


def _snapshot(env, extra: list[Path], digest) -> dict[str, str]:
    work = env["work"]
    return {"atlas": digest(work / "atlas.soma"), "registry": digest(work / "mlflow.db"),
            "artifacts": digest(work / "mlartifacts"),
            # Ray's temp link and our own logs aside: a refused command leaves no other trace
            "work dir entries": ",".join(sorted(p.name for p in work.iterdir() if p.name not in ("ray", "logs"))),
            **{str(p): digest(p) for p in extra}}


def run(cli, argv: list[str]) -> tuple[int, str, str]:
    r = cli.run(*argv)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_clearly_and_changes_nothing(name, env, tmp_path, cli):
    case = CASES[name]
    args, made = case.make(env, tmp_path)
    argv = [a.replace("{work}", str(env["work"])) for a in args]
    before = _snapshot(env, made, cli.digest)
    code, out, err = run(cli, argv)
    assert code == case.code, f"{name}: exit {code}\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}"
    assert "Traceback" not in err, err
    for words in case.says:
        assert words in err, f"{name}: {words!r} not in: {err}"
    after = _snapshot(env, made, cli.digest)
    assert after == before, f"{name} changed {[k for k in before if before[k] != after.get(k)]}"
    if name == "block_size_negative":  # no progress folder left to refuse the next valid run
        assert not list(tmp_path.glob("*.annotate-progress"))


# ---------------------------------------------------------------- right but surprising: accepted, and said
def test_surprising_inputs_are_ingested_with_a_warning(env, tmp_path, cli):
    genes, counts = env["genes"], env["counts"].copy()
    counts[:3] = 0  # three cells without counts
    mouse = [g.title() for g in genes]  # mouse-style symbols meet the human ones by upper case
    repeated = [*mouse[:-1], mouse[0].upper()]  # one symbol twice, once upper-cased
    path = write_h5ad(tmp_path / "mouse_style.h5ad", sp.csr_matrix(counts), repeated, obs_names=["c"] * 40)
    work = tmp_path / "work"
    digest = cli.digest(path)
    code, out, err = run(cli, ["ingest", str(path), "--work-dir", str(work)])
    assert code == 0, err
    said = out + err
    assert "3 of 40 cells have no counts" in said
    assert "1 gene symbols repeat" in said
    assert "no obs['cell_type']" in said and "unlabelled" in said
    assert "cell names repeat" in said
    assert cli.digest(path) == digest
    from scpretrain_dist.store import open_atlas

    store = open_atlas(work / "atlas.soma")
    (rec,) = store.datasets()
    assert rec.n_cells == 40 and rec.n_genes == len(genes) - 1 and not rec.labelled


def test_annotate_writes_a_copy_and_keeps_a_read_only_input(env, tmp_path, cli):
    import anndata as ad

    files = _h5ad_for_annotate("read_only")(env, tmp_path)
    query = files["query"]
    before = cli.digest(query)
    code, out, err = run(cli, [*[a.replace("{work}", str(env["work"])) for a in ANNOTATE], "--h5ad", str(query)])
    assert code == 0, err
    copy = tmp_path / "query_read_only.annotated.h5ad"
    assert str(copy) in out
    assert cli.digest(query) == before and stat.S_IMODE(query.stat().st_mode) == 0o444
    annotated = ad.read_h5ad(copy)
    assert annotated.obs["scpretrain_label"].notna().all()
    assert not list(tmp_path.glob("*.annotate-progress"))


def test_a_cell_without_model_genes_is_unassigned(env, tmp_path, cli):
    import anndata as ad

    counts = env["counts"].copy()
    counts[2] = 0  # no value at all
    path = write_h5ad(tmp_path / "with_empty.h5ad", counts, env["genes"])
    code, out, err = run(cli, [*[a.replace("{work}", str(env["work"])) for a in ANNOTATE], "--h5ad", str(path),
                               "--out", str(tmp_path / "o.h5ad")])
    assert code == 0, err
    obs = ad.read_h5ad(tmp_path / "o.h5ad").obs
    assert obs["scpretrain_label"].iloc[2] == "Unassigned" and obs["scpretrain_confidence"].iloc[2] == 0
    assert (obs["scpretrain_confidence"].drop(obs.index[2]) > 0).all()


def test_a_stale_progress_folder_never_blocks_a_valid_run(cli, env, tmp_path):
    files = _h5ad_for_annotate("plain")(env, tmp_path)
    query = files["query"]
    stale = tmp_path / "query_plain.annotated.h5ad.annotate-progress"
    stale.mkdir()
    (stale / "manifest.json").write_text(json.dumps({"model_uri": "models:/other/9", "n_cells": 3}))
    code, out, err = run(cli, [*[a.replace("{work}", str(env["work"])) for a in ANNOTATE], "--h5ad", str(query)])
    assert code == 0, err
    assert "starting over" in out and not stale.exists()


def test_failures_while_running_exit_1_with_their_message(env, tmp_path, cli, monkeypatch):
    from scpretrain_dist import pipeline

    def broken(*a, **k):
        raise RuntimeError("disk on fire\nmore detail\nthe real cause")

    monkeypatch.setattr(pipeline, "pretrain", broken)
    code, out, err = run(cli, ["pretrain", "--work-dir", str(env["work"])])
    assert code == 1 and "RuntimeError: disk on fire ... the real cause" in err and "--verbose" in err
    assert "Traceback" not in err
    code, out, err = run(cli, ["pretrain", "--work-dir", str(env["work"]), "--verbose"])
    assert code == 1 and "Traceback" in err


def test_work_dir_with_quotes_spaces_and_unicode_is_used_as_given(env, tmp_path, cli):
    odd = tmp_path / 'my "atlas" dïr ✓'
    code, out, err = run(cli, ["ingest", str(env["good"]), "--work-dir", str(odd)])
    assert code == 0, err
    assert (odd / "atlas.soma").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == [odd.name]  # nothing built anywhere else
    # a tab, which TileDB cannot address: refused before anything is made
    code, out, err = run(cli, ["ingest", str(env["good"]), "--work-dir", str(tmp_path / "a\tb")])
    assert code == 2 and "control character" in err and "'\\t'" in err
    assert [p.name for p in tmp_path.iterdir()] == [odd.name]


def test_too_small_targets_and_low_overlap(env, tmp_path, cli):
    """A 3-cell, single-type dataset is a fine ingest but no fine-tuning target; a dataset sharing
    a third of its genes with the atlas is accepted with a warning."""
    work = tmp_path / "work"
    shutil.copytree(env["work"] / "atlas.soma", work / "atlas.soma")
    genes, counts = env["genes"], env["counts"]
    tiny = write_h5ad(tmp_path / "tiny3.h5ad", sp.csr_matrix(counts[:3]), genes, labels=["T"] * 3)
    third = [*genes[:40], *(f"NEWGENE{i}" for i in range(80))]
    partial = write_h5ad(tmp_path / "partial.h5ad", sp.csr_matrix(counts), third, labels=["a", "b"] * 20)
    code, out, err = run(cli, ["ingest", str(tiny), str(partial), "--work-dir", str(work)])
    assert code == 0, err
    assert "dataset partial" in out and "shares only 40 of its 120 genes" in out
    atlas = cli.digest(work / "atlas.soma")
    for argv in (["finetune", "--target", "tiny3"], ["evaluate", "--targets", "tiny3"]):
        code, out, err = run(cli, [*argv, "--work-dir", str(work)])
        assert code == 2 and "target 'tiny3' has 3 labelled cells" in err and "at least 10" in err, err
    assert cli.digest(work / "atlas.soma") == atlas
    assert not (work / "mlflow.db").exists()  # refused before any MLflow run
    # genes of a deliberate naming of their own (refused by default: ingest_no_gene_overlap), accepted
    # when the catalog says so
    write_h5ad(tmp_path / "anon.h5ad", sp.csr_matrix(counts), [f"anon_{i}" for i in range(len(genes))])
    catalog = tmp_path / "anon.toml"
    catalog.write_text('[[dataset]]\nname = "anon"\npath = "anon.h5ad"\nown_genes = true\n')
    code, out, err = run(cli, ["ingest", "--catalog", str(catalog), "--work-dir", str(work)])
    assert code == 0 and "own_genes = true" in out, err
