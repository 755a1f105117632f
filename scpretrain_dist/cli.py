"""``scpretrain <stage> ...``: parse, build the config, call the stage.

Exit codes: 0 done; 2 a usage error (an argument, setting, file, store, model or request that
cannot be used; the message says which and what to do); 1 a failure while running; 130
interrupted; 143 terminated (SIGTERM). ``--verbose`` prints the traceback of either.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from scpretrain_dist import console, recipes
from scpretrain_dist.config import JOB_ADDRESS_PREFIXES, ConfigError, RunConfig, UserError


def _config(args, **sections) -> RunConfig:
    """The recipe, --config, --set and --work-dir, then ``sections``: {section: {key: value}}
    from the command's own options. The command's full log goes under its work dir."""
    cfg = recipes.configure(args.recipe, args.config, args.set, args.work_dir, **sections)
    console.log_to(cfg.work_dir)
    return cfg


def _integer(minimum: int, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum]."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {value}")
        return value

    return integer


_positive = _integer(1)
_non_negative = _integer(0)


def _common(p: argparse.ArgumentParser, recipe: str = "tiny") -> None:
    p.add_argument("--recipe", default=recipe, help=f"base settings: {', '.join(recipes.RECIPES)} (default {recipe})")
    p.add_argument("--config", help="TOML or YAML file of settings, applied over the recipe")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set pretrain.epochs=5 (repeatable)")
    p.add_argument("--work-dir", help="where the atlas, MLflow store, checkpoints and reports go")
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="print the full traceback of an error")


def cmd_demo_data(args) -> None:
    from scpretrain_dist.pipeline import demo_data

    sizes = {"n_cells": args.cells, "n_datasets": args.datasets, "n_genes": args.genes, "seed": args.seed}
    cfg = _config(args, demo={k: v for k, v in sizes.items() if v is not None})
    if args.cells is not None:
        _demo_store(cfg, args)
        return
    if args.store_uri or args.format:
        raise ConfigError("--store-uri and --format need --cells (the atlas-size demo streamed into a store)")
    out = args.out or str(Path(cfg.work_dir) / "demo_data")
    paths = demo_data(cfg, out)
    print(f"wrote {len(paths)} datasets and catalog.toml to {out}")


def _demo_store(cfg: RunConfig, args) -> None:
    """The atlas-size demo: streamed block by block into a SOMA (or zarr) store."""
    import time

    from scpretrain_dist.demo import write_demo_store
    from scpretrain_dist.runtime import peak_rss_mib

    if args.out:
        raise ConfigError("--out is for the .h5ad demo; with --cells give --store-uri (or --work-dir)")
    fmt = args.format or "soma"
    uri = args.store_uri or (cfg.store_uri if fmt == "soma" else str(Path(cfg.work_dir) / "atlas.zarr"))
    t0 = time.perf_counter()
    rep = write_demo_store(cfg.demo, uri, fmt)
    print(f"{uri}: {len(rep.added)} datasets written, {len(rep.skipped)} already present, "
          f"{cfg.demo.n_genes} genes, {time.perf_counter() - t0:.1f}s, peak RSS {peak_rss_mib():.0f} MiB")


def cmd_export(args) -> None:
    from scpretrain_dist.store.atlas import copy_atlas, open_atlas

    cfg = _config(args)
    uri = args.store_uri or cfg.store_uri
    if not Path(uri).exists():
        raise ConfigError(f"no atlas at {uri}; give --store-uri or --work-dir of an existing atlas")
    if Path(args.out).exists():
        raise ConfigError(f"{args.out} already exists; export into a new path")
    source = open_atlas(uri, cfg.store.backend)
    rep = copy_atlas(source.locator.pinned().atlas(), args.out, datasets=args.datasets or None, log=lambda _m: None)
    print(f"exported {len(rep.added)} datasets of {uri} to {args.out}")


def cmd_ingest(args) -> None:
    from scpretrain_dist.pipeline import ingest

    cfg = _config(args)
    if not args.inputs and not args.catalog:
        raise ConfigError("give .h5ad files, folders of them, or --catalog FILE")
    rep = ingest(cfg, args.inputs, catalog=args.catalog, root=args.root)
    print(f"atlas {cfg.store_uri}: {len(rep.added)} added, {len(rep.skipped)} already present, "
          f"{rep.n_genes_after} genes")


def cmd_pretrain(args) -> None:
    from scpretrain_dist.pipeline import pretrain, pretraining_datasets
    from scpretrain_dist.runtime import ray_scope
    from scpretrain_dist.store.atlas import atlas_for
    from scpretrain_dist.tracking.mlflow_runs import stage_run

    cfg = _config(args)
    exclude = tuple(args.exclude or cfg.pretrain.exclude_datasets)
    pretraining_datasets(atlas_for(cfg), exclude, cfg.pseudolabel.min_k)  # checked before any run starts
    with ray_scope(), stage_run("pretrain", cfg):
        result, _ = pretrain(cfg, exclude=exclude, reuse=not args.no_cache)
    print(f"encoder: {result.encoder_path}")


def cmd_finetune(args) -> None:
    from scpretrain_dist.pipeline import (
        check_query,
        check_targets,
        finetune_and_evaluate,
        installed_methods,
        stage_run,
    )
    from scpretrain_dist.store.atlas import atlas_for
    from scpretrain_dist.train.pretrain import load_result

    cfg = installed_methods(_config(args))
    result = load_result(args.pretrain_result) if args.pretrain_result else None
    check_targets(atlas_for(cfg), args.target, result)  # before any run starts
    if args.query:
        check_query(cfg, atlas_for(cfg), args.query, args.target, result)
    with stage_run("finetune-evaluate", cfg) as run:
        encoder_run = _encoder_run(Path(args.pretrain_result).resolve()) if result else None
        finetune_and_evaluate(cfg, args.target, result, encoder_run, args.out or Path(cfg.work_dir) / "report",
                              register=result is not None, query=args.query)
    print(f"MLflow run {run.info.run_id}")


def _encoder_run(result_path: Path) -> str | None:
    """The MLflow run that trained the encoder of ``pretrain/<key>/result.json`` (for the
    registered model's lineage), if this tracking store has it."""
    from scpretrain_dist.tracking.mlflow_runs import find_run

    return find_run("pretrain_key", (result_path if result_path.is_dir() else result_path.parent).name)


def cmd_evaluate(args) -> None:
    from scpretrain_dist.pipeline import (
        check_lodo,
        check_transfer,
        evaluate_lodo,
        evaluate_transfer,
        installed_methods,
        resolve_targets,
        stage_run,
    )
    from scpretrain_dist.runtime import ray_scope
    from scpretrain_dist.store.atlas import atlas_for

    evaluate: dict = {}
    if args.group:  # --group names the targets; it replaces targets listed in the work dir's config
        evaluate |= {"group": args.group, "targets": []}
    if args.folds:
        evaluate["folds"] = args.folds
    if args.budgets:
        evaluate["budgets"] = list(args.budgets)
    if args.methods:
        evaluate["methods"] = list(args.methods)
    cfg = _config(args, evaluate=evaluate)
    if not Path(cfg.store_uri).exists():
        raise ConfigError(f"no atlas at {cfg.store_uri}; run `scpretrain ingest ... --work-dir {cfg.work_dir}` first")
    store = atlas_for(cfg)
    out = args.out or Path(cfg.work_dir) / f"report_{args.protocol}"
    cfg = installed_methods(cfg)
    # every input checked before any MLflow run, K-means or training starts
    if args.hold_out_types and args.protocol != "transfer":
        raise ConfigError("--hold-out-types removes types from the references of the transfer protocol; "
                          "add --protocol transfer --references ... --queries ...")
    if args.pairwise and args.protocol != "transfer":
        raise ConfigError("--pairwise pairs references with queries in the transfer protocol; "
                          "add --protocol transfer --references ... --queries ...")
    if args.protocol == "lodo":
        targets = resolve_targets(cfg, store, args.targets)
        check_lodo(cfg, store, targets)
    else:
        refs = args.references or list(cfg.evaluate.references)
        queries = args.queries or list(cfg.evaluate.queries)
        mapping = args.label_mapping or cfg.evaluate.label_mapping or None
        check_transfer(cfg, store, refs, queries, mapping, args.hold_out_types, args.pairwise)
    with ray_scope(), stage_run(f"evaluate-{args.protocol}", cfg):
        if args.protocol == "lodo":
            evaluate_lodo(cfg, targets, out)
        else:
            evaluate_transfer(cfg, refs, queries, mapping, out, hold_out=args.hold_out_types, pairwise=args.pairwise)


def cmd_quickstart(args) -> None:
    from scpretrain_dist.pipeline import quickstart

    cfg = _config(args)
    if args.data:
        if not Path(args.data).exists():
            raise ConfigError(f"--data {args.data} does not exist")
        if args.recipe == "tiny" and not args.set:
            cfg = recipes.configure("real_cpu", args.config, (), cfg.work_dir)
    out = quickstart(cfg, args.data)
    print(json.dumps({k: round(v, 1) for k, v in out["timings"].items()}))


def cmd_models(args) -> None:
    from scpretrain_dist.tracking.mlflow_runs import setup
    from scpretrain_dist.tracking.registry import describe_models

    cfg = _config(args)
    setup(cfg)
    print("\n".join(describe_models(cfg.tracking_uri)))


def cmd_annotate(args) -> None:
    """Annotate whole datasets (atlas or .h5ad) with a registered model."""
    from scpretrain_dist.tracking.registry import ModelFetch

    cfg = _config(args)
    if args.h5ad and args.datasets:
        raise ConfigError("--datasets selects atlas datasets; it does not go with --h5ad")
    if args.store_uri and (args.out or args.overwrite or args.in_place):
        raise ConfigError("--out, --in-place and --overwrite are for --h5ad; atlas annotations go into obs "
                          "columns of the store")
    if args.out and args.in_place:
        raise ConfigError("--out writes a new file and --in-place replaces the input; give one of them")
    # the model is fetched from the registry (beside this process, where it has not loaded
    # MLflow) while torch and the rest load here
    with ModelFetch(args.model, cfg.tracking_uri) as model:
        from scpretrain_dist.serve.annotate import annotate_h5ad, annotate_store

        common = dict(embedding=args.embedding, block_size=args.block_size, workers=args.workers)
        if args.store_uri:
            rep = annotate_store(cfg, model, args.store_uri, datasets=args.datasets, **common)
        else:
            rep = annotate_h5ad(cfg, model, args.h5ad, out=args.out, in_place=args.in_place,
                                overwrite=args.overwrite, **common)
    print(f"annotated {rep.n_cells} cells of {', '.join(rep.datasets)} with {rep.model_uri} into {rep.target}: "
          f"{rep.blocks_computed} blocks computed, {rep.blocks_skipped} already done, {rep.seconds:.1f} s "
          f"({rep.cells_per_second:,.0f} cells/s)")
    for what, where in rep.columns.items():
        print(f"  {what}: {where}")
    for name, verdict in rep.gene_model.items():
        print(f"  {name}: {verdict}")


def cmd_markers(args) -> None:
    """Saliency-derived marker genes of each cell type a registered model calls in an .h5ad."""
    from scpretrain_dist.tracking.registry import ModelFetch

    cfg = _config(args)
    path = Path(args.h5ad)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise ConfigError(f"--json {args.json}: its folder does not exist")
    with ModelFetch(args.model, cfg.tracking_uri) as model:  # beside the imports and the file's read, as annotate
        from scpretrain_dist.catalog.entries import read_h5ad
        from scpretrain_dist.serve.annotate import AnnotateError, load_annotator
        from scpretrain_dist.serve.pyfunc import InputError

        adata = read_h5ad(path, "--h5ad")
        annotator = load_annotator(model)
    try:
        markers = annotator.marker_genes(adata.X, [str(g) for g in adata.var_names], args.value_type, args.top)
    except InputError as e:
        raise AnnotateError(f"{path}: {e}") from None
    for name, m in markers.items():
        genes = ", ".join(g for g, _ in m["genes"][: min(args.top, 10)])
        print(f"{name} ({m['cells']} cells): {genes}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "h5ad": str(path), "method": "gradient x input, "
                                               "mean over the cells called each type", "markers": markers}, indent=1))
        print(f"wrote {args.json}")


def cmd_serve(args) -> None:
    """The scoring server for a registered annotator, on 127.0.0.1 unless told otherwise."""
    from scpretrain_dist.serve.server import serve
    from scpretrain_dist.tracking.registry import resolve_model

    cfg = _config(args)
    ref = resolve_model(args.model, cfg.tracking_uri)  # an unknown model is refused here, clearly
    print(f"serving {args.model} ({ref.uri}) on http://{args.host}:{args.port}/invocations", flush=True)
    serve(ref.uri, cfg.tracking_uri, args.host, args.port)


def cmd_bench(args) -> None:
    import importlib

    from scpretrain_dist.bench.report import emit

    mod = importlib.import_module(f"scpretrain_dist.bench.{args.benchmark.replace('-', '_')}")
    emit(mod.run(args), args.json)


# commands that run as a Ray job (the others serve, list or submit from where they are typed)
_JOB_COMMANDS = ("demo-data", "ingest", "export", "pretrain", "finetune", "evaluate", "quickstart", "annotate",
                 "markers", "bench")


def cmd_submit(args) -> None:
    from scpretrain_dist.runtime import submit_job

    command = args.job[1:] if args.job[:1] == ["--"] else args.job
    if not command or command[0] not in _JOB_COMMANDS:
        raise ConfigError(f"give the command the job runs after --, one of: {', '.join(_JOB_COMMANDS)} "
                          f"(got {' '.join(command) or 'nothing'})")
    if any(a == "--work-dir" or a.startswith("--work-dir=") for a in command):
        raise ConfigError("give --work-dir to submit (before --), not to the job's command")
    if not Path(args.work_dir).is_absolute():
        raise ConfigError(f"--work-dir {args.work_dir!r} must be an absolute path on storage every node of the "
                          "cluster mounts (the job's MLflow store, checkpoints and report go there)")
    try:  # the job's command and its settings, checked here before anything is submitted
        job = build_parser().parse_args([*command, "--work-dir", args.work_dir])
    except SystemExit:
        raise ConfigError(f"the job's command `scpretrain {' '.join(command)}` is not valid (see the message above)") from None
    # its settings too (a settings file only the cluster has is checked there): the tracking URI
    # printed is the one the job resolves (the forwarded MLFLOW_TRACKING_URI, a --set, or the work dir's)
    file = getattr(job, "config", None)
    cfg = recipes.configure(getattr(job, "recipe", "tiny"), file if file and Path(file).exists() else None,
                            getattr(job, "set", ()), args.work_dir)
    address = args.address or os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(JOB_ADDRESS_PREFIXES):
        raise ConfigError("give the cluster's job address with --address http://HEAD:8265 or RAY_ADDRESS"
                          + (f" (got {address!r})" if address else ""))
    code = submit_job(address, cfg, command, wait=not args.no_wait, working_dir=args.working_dir)
    if code:
        raise RuntimeError("the job did not succeed (its log is above)")


def _bench_parsers(sub) -> None:
    import importlib

    from scpretrain_dist.bench import BENCHMARKS

    p = sub.add_parser("bench", help="benchmarks: ours vs peers, printed and written as JSON")
    bsub = p.add_subparsers(dest="benchmark", required=True)
    for name in BENCHMARKS:
        try:
            mod = importlib.import_module(f"scpretrain_dist.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("scpretrain_dist.bench"):
                continue  # not written yet
            raise
        b = bsub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else name)
        _common(b)
        b.add_argument("--json", metavar="FILE", help="also write the result as JSON here")
        mod.add_arguments(b)
        b.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scpretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="print the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="synthetic multi-dataset atlas: small .h5ad files, or any size "
                       "streamed into the store (--cells)")
    _common(p)
    p.add_argument("--out", help="output folder of the .h5ad demo (default <work-dir>/demo_data)")
    p.add_argument("--cells", type=_positive, help="atlas size: stream this many cells into the store "
                   "(never held in memory) instead of writing .h5ad files")
    p.add_argument("--datasets", type=_positive, help="number of datasets (sizes log-normal with --cells)")
    p.add_argument("--genes", type=_positive, help="number of genes of the atlas")
    p.add_argument("--seed", type=_non_negative, help="random seed (same seed, same atlas)")
    p.add_argument("--store-uri", help="with --cells: the store to write (default <work-dir>/atlas.soma, "
                   "or atlas.zarr for --format zarr)")
    p.add_argument("--format", choices=["soma", "zarr"], help="with --cells: store format (default soma)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("export", help="copy the atlas (either backend) into a new zarr one")
    _common(p)
    p.add_argument("format", choices=["zarr"])
    p.add_argument("out", help="path of the new store")
    p.add_argument("--store-uri", help="the SOMA atlas to read (default <work-dir>/atlas.soma)")
    p.add_argument("--datasets", nargs="*", help="datasets to export (default: all)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ingest", help="add .h5ad datasets to the SOMA atlas")
    _common(p)
    p.add_argument("inputs", nargs="*", help=".h5ad files or folders of them")
    p.add_argument("--catalog", help="a catalog TOML (see data_catalog/)")
    p.add_argument("--root", help="folder the catalog's paths are relative to (overrides its root)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("pretrain", help="multi-task pretraining with Ray Train")
    _common(p)
    p.add_argument("--exclude", nargs="*", help="datasets left out of pretraining")
    p.add_argument("--no-cache", action="store_true",
                   help="retrain from the start even if a matching encoder or an interrupted run exists")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune on labelled target datasets and evaluate")
    _common(p)
    p.add_argument("--target", nargs="+", required=True)
    p.add_argument("--pretrain-result", help="result.json of a pretraining (omit for no pretraining)")
    p.add_argument("--query", metavar="DATASET", help="an atlas dataset (labels not needed) the model is meant to "
                   "annotate: also fine-tune semi-supervised on its cells (scpretrain_ssl, guarded) and register "
                   "that model")
    p.add_argument("--out", help="report folder")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="lodo: pretrain without the targets, fine-tune on each, report; "
                                          "transfer: fine-tune on references, predict queries")
    _common(p)
    p.add_argument("--protocol", default="lodo", choices=["lodo", "transfer"])
    p.add_argument("--targets", nargs="*", help="lodo: labelled datasets to hold out and fine-tune on")
    p.add_argument("--group", help="lodo: every labelled dataset of this catalog group is a target (e.g. pbmc)")
    p.add_argument("--folds", help="grouped: one pretraining without all targets (default); per_target: one per "
                                   "target; N: N folds, each pretrained without its own targets only")
    p.add_argument("--budgets", nargs="+", type=_positive, metavar="N", help="labelled training cells to sweep (default 25 50 100 250 1000)")
    p.add_argument("--methods", nargs="+", help="methods to compare (default: all)")
    p.add_argument("--references", nargs="+", help="transfer: labelled reference datasets to fine-tune on")
    p.add_argument("--queries", nargs="+", help="transfer: datasets to predict")
    p.add_argument("--pairwise", action="store_true",
                   help="transfer: each reference alone to each query other than itself (every ordered pair; "
                        "the report adds the transfer matrix and a heat-map per method)")
    p.add_argument("--label-mapping", help="transfer: JSON {dataset: {label: shared label or null}}")
    p.add_argument("--hold-out-types", "--hold-out-type", nargs="+", metavar="TYPE",
                   help="transfer: remove each of these reference types in turn ('all': every one) and score how "
                        "well the models reject the query's cells of it as unknown")
    p.add_argument("--out", help="report folder (default <work-dir>/report_<protocol>)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("quickstart", help="demo data (or --data) -> ingest -> pretrain -> fine-tune -> report -> registry")
    _common(p)
    p.add_argument("--data", help="folder of .h5ad files or a catalog TOML instead of demo data")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("submit", help="run a command as a Ray job on a cluster: scpretrain submit --work-dir /shared/w "
                                      "-- pretrain --recipe atlas_8gpu")
    p.add_argument("--address", help="the cluster's job address, http://HEAD:8265 (default $RAY_ADDRESS)")
    p.add_argument("--work-dir", required=True, help="absolute, on storage every node mounts: the job's MLflow "
                                                     "store, checkpoints and report")
    p.add_argument("--working-dir", help="a folder uploaded with the job (this checkout, when the cluster's image "
                                         "does not have the package)")
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the job's log")
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="print the full traceback of an error")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- then the command and its options")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("serve", help="serve a registered model over HTTP (MLflow scoring server)")
    _common(p)
    p.add_argument("--model", default="models:/scpretrain-annotator@champion")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_integer(1, 65535), default=5001)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("annotate", help="annotate whole datasets of the atlas, or an .h5ad, with a registered model")
    _common(p)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store-uri", help="the SOMA atlas: predictions go into obs columns named after the model version")
    where.add_argument("--h5ad", help="an .h5ad: obs['scpretrain_label'], obs['scpretrain_confidence'], obsm['X_scpretrain']")
    p.add_argument("--datasets", nargs="+", help="atlas datasets to annotate (default: all)")
    p.add_argument("--out", help="--h5ad: the annotated copy to write (default <input>.annotated.h5ad beside the "
                   "input; the input is never changed), or a table of the calls, keyed by obs name, when it ends "
                   "in .csv, .tsv or .parquet (no copy of the file)")
    p.add_argument("--in-place", action="store_true", help="--h5ad: add the entries to the input file itself "
                   "(replaced in one rename once every block is done; its permissions are kept)")
    p.add_argument("--embedding", action="store_true", help="also write the 200-d embedding of every cell")
    p.add_argument("--block-size", type=_positive, help="cells per block (default annotate.block_size)")
    p.add_argument("--workers", type=_non_negative, help="Ray actors (default annotate.workers; 0 runs in this process)")
    p.add_argument("--overwrite", action="store_true", help="--h5ad: replace scpretrain_* entries the input already has")
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("markers", help="saliency-derived marker genes of the cell types a registered model calls in an .h5ad")
    _common(p)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--h5ad", required=True, help="cells to explain (counts or log-normalised, gene symbols)")
    p.add_argument("--top", type=_positive, default=20, help="genes per cell type (default 20)")
    p.add_argument("--value-type", default="auto", choices=["auto", "counts", "lognorm", "log2norm"])
    p.add_argument("--json", help="write the markers (gene, mean attribution) per type to this file")
    p.set_defaults(func=cmd_markers)

    p = sub.add_parser("models", help="registered models with their lineage")
    _common(p)
    p.add_argument("action", nargs="?", default="list", choices=["list"])
    p.set_defaults(func=cmd_models)

    _bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    where = f"scpretrain {args.command}"
    console.start(args.command, verbose)
    code = 0
    previous = _interrupt_on_sigterm()
    try:
        args.func(args)
    except UserError as e:
        _traceback(verbose)
        console.detail(f"usage error: {e}")
        print(f"{where}: error: {e}", file=sys.stderr)
        code = 2
    except Terminated:
        print(f"{where}: terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
        code = 143
    except KeyboardInterrupt:
        print(f"{where}: interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    except Exception as e:  # a failure while running: its message, the traceback on request
        _traceback(verbose)
        import traceback

        console.detail("failure:\n" + traceback.format_exc())
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        said = lines[0] if lines else ""
        if len(lines) > 1:  # wrapped errors (Ray's) put the cause last
            said += f" ... {lines[-1]}"
        print(f"{where}: failed: {type(e).__name__}: {said}"
              + ("" if verbose else " (rerun with --verbose for the traceback)"), file=sys.stderr)
        code = 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        log = console.finish()
    if log is not None and (code != 0 or args.command in _LONG_COMMANDS):
        print(f"full log: {log}", file=sys.stderr if code else sys.stdout)
    return code


_LONG_COMMANDS = {"quickstart", "pretrain", "finetune", "evaluate", "ingest", "annotate", "bench"}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, a pod's eviction, ``kill``): unwinds like Ctrl-C, so that MLflow
    runs end KILLED and progress already written stays."""


def _interrupt_on_sigterm():
    """Install the handler; return the one it replaced (None off the main thread)."""
    def handler(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _traceback(verbose: bool) -> None:
    if verbose:
        import traceback

        traceback.print_exc()


def run() -> int:
    """The ``scpretrain`` program: :func:`main` in a process of its own, which then exits without
    a last garbage collection (``console.exit_without_final_collection``). Tests call ``main``."""
    console.exit_without_final_collection()
    return main()


if __name__ == "__main__":
    sys.exit(run())
