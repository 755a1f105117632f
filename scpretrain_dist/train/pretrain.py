"""Multi-task pretraining: iterations of (refresh pseudo-labels on the actor pool, train the
shared encoder with Ray Train DDP). One checkpoint per iteration."""

from __future__ import annotations

import functools
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from scpretrain_dist.config import ConfigError, ModelConfig, PretrainConfig, RunConfig, StreamConfig
from scpretrain_dist.console import detail, progress
from scpretrain_dist.pseudolabel.features import read_encoder, write_encoder
from scpretrain_dist.pseudolabel.pool import (
    KMeansPool,
    PseudoLabels,
    agreement,
    refresh_pseudo_labels,
)
from scpretrain_dist.store.atlas import Locator, atlas_for
from scpretrain_dist.store.files import exclusive, write_json_whole
from scpretrain_dist.tracking.mlflow_runs import RunLog
from scpretrain_dist.train.board import Board

ENCODER_FILE = "encoder.pt"
META_FILE = "meta.json"


@dataclass
class PretrainResult:
    encoder_path: str  # encoder.pt of the last iteration
    datasets: list[str]
    iterations_run: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_after_iteration: int | None = None  # a rerun after a crash started after this one


PROGRESS_FILE = "progress.json"
RESULT_FILE = "result.json"


def labels_file(out_dir: Path, version: int) -> Path:
    """Where a pretraining (its folder ``out_dir``) keeps pseudo-labels v``version``."""
    return Path(out_dir) / f"pseudo_labels_v{version}.npz"


def load_result(path: str | Path) -> PretrainResult:
    """A pretraining's ``result.json`` (``scpretrain pretrain`` prints where), checked: readable,
    of the expected form, and naming an encoder that still exists."""
    path = Path(path)
    what = f"--pretrain-result {path}"
    if path.is_dir():
        path = path / RESULT_FILE
    if not path.is_file():
        raise ConfigError(f"{what} does not exist; give the result.json of a pretraining "
                          "(<work-dir>/pretrain/<key>/result.json, printed by `scpretrain pretrain`)")
    try:
        data = json.loads(path.read_text())
        result = PretrainResult(**data)
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} is not a pretraining result ({type(e).__name__}: {str(e)[:200]}); give the "
                          "result.json a pretraining wrote") from None
    if not isinstance(result.encoder_path, str) or not isinstance(result.datasets, list):
        raise ConfigError(f"{what} is not a pretraining result (no encoder_path or datasets)")
    if not Path(result.encoder_path).is_file():
        raise ConfigError(f"{what} names the encoder {result.encoder_path}, which is gone; pretrain again "
                          "(`scpretrain pretrain`) or give another result")
    return result


def _read_progress(out_dir: Path, log) -> dict | None:
    """The last finished step of an interrupted run in this directory (same datasets and
    settings: the directory is named after them), or None when there is none usable."""
    path = out_dir / PROGRESS_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        missing = [f for f in (state["encoder_path"], state.get("labels_path")) if f and not Path(f).exists()]
    except (ValueError, KeyError, TypeError) as e:
        log(f"  {path} is unreadable ({e}); starting from the beginning")
        return None
    if missing:
        log(f"  {path} names files that are gone ({', '.join(missing)}); starting from the beginning")
        return None
    return state


def load_encoder(path: str | Path) -> dict[str, np.ndarray]:
    return read_encoder(path)


def pretrain_loop_per_worker(config: dict) -> None:  # Ray Train hands it {"worker": WorkerConfig}
    """Runs on every Ray Train worker: iterations ``w.iteration`` to ``w.until``, one report per
    iteration (rank 0's with the encoder checkpoint). Between two iterations every rank waits on
    the board for the next pseudo-labels, which the driver makes from the encoder just reported.
    A worker group restarted after a failure goes on after the last iteration the driver has
    recorded (the board's, not Ray's latest checkpoint: a report the controller had not taken
    in before the worker died is not lost)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    w = config["worker"]
    device = ray.train.torch.get_device()
    it, labels_path = w.iteration, w.labels_path
    encoder = load_encoder(w.init_encoder) if w.init_encoder else None
    done = ray.get(w.board.last_recorded.remote()) if w.board is not None else None
    if done is not None:  # a restarted worker group
        encoder, it = load_encoder(Path(done[1]) / ENCODER_FILE), done[0] + 1
        labels_path = _next_labels(w.board, it) if it <= w.until else None
        if labels_path is None:
            return
    while True:
        encoder = _train_iteration(w, it, labels_path, encoder, rank, world, device)
        if it >= w.until or (labels_path := _next_labels(w.board, it + 1)) is None:
            return
        it += 1


def _next_labels(board, iteration: int) -> str | None:
    """The pseudo-labels the driver posts for ``iteration``, once it has; None: stop here."""
    import ray

    while True:
        ready, labels_path = ray.get(board.next_labels.remote(iteration))
        if ready:
            return labels_path
        time.sleep(0.2)


def _train_iteration(w: WorkerConfig, it: int, labels_path: str, encoder: dict | None, rank: int, world: int,
                     device) -> dict[str, np.ndarray]:
    """Iteration ``it``: a model with fresh heads for ``labels_path``'s partitions on ``encoder``
    (random when None), trained for the configured epochs; returns its encoder."""
    import ray.train
    import ray.train.torch

    from scpretrain_dist.data.loader import open_shard
    from scpretrain_dist.model.networks import PretrainModel
    from scpretrain_dist.train.optim import LazyAdam
    from scpretrain_dist.train.parallel import (
        GeneRowExchange,
        RowGradSync,
        broadcast_parameters,
        shard_by_gene,
    )
    from scpretrain_dist.train.steps import pretrain_eval, pretrain_step

    p = w.pretrain
    torch.manual_seed(p.seed + it)
    labels = PseudoLabels.load(labels_path)
    datasets = list(w.datasets)
    sparse = p.sparse_updates
    # on CPUs the encoder takes sparse gradients, and with several workers its rows are
    # sharded by gene unless pretrain.encoder_sharding = "none"
    sparse_encoder = sparse and device.type == "cpu"
    gene_sharded = sparse_encoder and world > 1 and p.encoder_sharding == "genes"
    # pretrain.loader: "memory" or "stream"
    shard = open_shard(w, labels, rank, world, gene_sharded=gene_sharded)
    if device.type == "cuda" and hasattr(shard, "to_device"):
        shard = shard.to_device(device)  # the in-memory shard moves to the GPU: batches made there
    ks = [labels.ks[d] for d in datasets]
    model = PretrainModel(w.n_genes, ks, w.model.embedding_dim, w.model.head_activation,
                          sparse_grad=sparse, head_layout=p.head_layout,
                          encoder_sparse_grad=sparse_encoder)
    if encoder is not None:
        with torch.no_grad():
            model.encoder.weight.copy_(torch.as_tensor(encoder["weight"]))
            model.encoder.bias.copy_(torch.as_tensor(encoder["bias"]))
    sync = exchange = None
    if sparse:
        # rows a batch touched only: lazy Adam, and an all-reduce of the touched rows instead
        # of DDP's dense all-reduce of every parameter
        model = model.to(device)
        broadcast_parameters(model)
        if world > 1:
            enc = model.encoder
            if gene_sharded:  # the exchange averages the encoder's weight
                exchange = GeneRowExchange(w.n_genes, rank, world)
                shard_by_gene(enc, exchange)
                row_sparse, skip = [], (enc.weight,)
            else:
                row_sparse, skip = ([enc.weight] if enc.sparse_grad else []), ()
            wire = getattr(torch, p.gradient_sync_dtype)
            sync = RowGradSync(model, [*row_sparse, *model.heads.weights], wire_dtype=wire, skip=skip)
        optimizer = LazyAdam(model.parameters(), lr=p.lr)
    else:
        model = ray.train.torch.prepare_model(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=p.lr)
    n_epochs = p.epochs
    history = []  # per epoch: (seconds, loss, cells per second per worker)
    n_steps = 0
    for epoch in range(n_epochs):
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64)  # loss*cells, accuracy*cells, cells
        model.train()
        for x, didx, lab in shard.batches(p.batch_size, p.seed, epoch + 1000 * it, device):
            out = pretrain_step(model, x, didx, lab, optimizer, sync_gradients=sync)
            n_steps += 1
            n = len(didx)
            sums += torch.tensor([out.total.item() * n, out.accuracy * n, n], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(sums)
        metrics = {
            "iteration": it,
            "epoch": epoch,
            "loss": float(sums[0] / sums[2]),
            "pseudo_label_accuracy": float(sums[1] / sums[2]),
            "cells_per_second_per_worker": float(sums[2] / world / (time.perf_counter() - t0)),
        }
        history.append([time.perf_counter() - t0, metrics["loss"], metrics["cells_per_second_per_worker"]])
        if rank == 0 and epoch < n_epochs - 1 and w.board is not None:  # the driver logs and shows it
            w.board.put.remote({"epoch": metrics | {"world": world}})
    metrics["epoch_history"] = history
    metrics["torch_threads"] = torch.get_num_threads()
    if exchange is not None:
        metrics["encoder_exchange_seconds"] = exchange.seconds
    if sync is not None:
        metrics["gradient_sync_seconds"] = sync.seconds
        metrics["gradient_rows_sent_per_step"] = sync.rows_sent / max(1, n_steps)
    metrics.update(_final_metrics(w, model, shard, device, world, pretrain_eval, exchange))
    trained = getattr(model, "module", model).encoder
    name = f"iteration_{it:02d}"
    # one report per iteration (each is a round with the controller): the epochs' metrics travel
    # in epoch_history, and live progress on the board
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="scp-ckpt-") as tmp:
            write_encoder(trained, Path(tmp) / ENCODER_FILE)
            (Path(tmp) / META_FILE).write_text(json.dumps({
                "iteration": it, "datasets": datasets, "labels_path": labels_path,
                "locator": asdict(w.locator), "metrics": metrics}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        if w.board is not None:  # after the report: the checkpoint is in storage when the driver hears of it
            w.board.put.remote({"epoch": {k: v for k, v in metrics.items() if k != "epoch_history"} | {"world": world},
                                "iteration": {"iteration": it, "checkpoint": name, "metrics": metrics}})
    else:
        ray.train.report(metrics)
    return {"weight": trained.weight.detach().cpu().clone(), "bias": trained.bias.detach().cpu().clone()}


def _final_metrics(w: WorkerConfig, model, shard, device, world: int, pretrain_eval, exchange=None) -> dict:
    """Peak RSS of every worker; on request the loss over every cell without updates and the
    largest difference between the replicas' parameters (0 when data parallelism is sound).
    An encoder sharded by gene (``exchange``) is evaluated as it trained, then its rows are
    assembled on every rank for the replica check and the checkpoint."""
    from scpretrain_dist.runtime import peak_rss_mib

    out = {}
    rss = torch.tensor([peak_rss_mib()], dtype=torch.float64)
    if world > 1:
        gathered = [torch.zeros_like(rss) for _ in range(world)]
        torch.distributed.all_gather(gathered, rss)
        rss = torch.cat(gathered)
    out["peak_rss_mib_per_worker"] = [round(float(v), 1) for v in rss]
    if w.final_eval:
        model.eval()
        sums = torch.tensor(pretrain_eval(model, shard.batches(w.pretrain.batch_size, w.pretrain.seed, 10**6, device)),
                            dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(sums)
        out["final_eval_loss"] = float(sums[0] / sums[2])
        out["final_eval_accuracy"] = float(sums[1] / sums[2])
    if exchange is not None:
        exchange.assemble(model.encoder.weight)
        from scpretrain_dist.train.parallel import unshard

        unshard(model.encoder)
    if w.check_replicas and world > 1:
        flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])
        lo, hi = flat.clone(), flat.clone()
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        out["replica_max_diff"] = float((hi - lo).max())
    return out


@dataclass(frozen=True)
class WorkerConfig:
    """What every training worker of one Ray Train run receives: the typed settings and the
    run's locator, datasets, first iteration and its pseudo-labels."""

    pretrain: PretrainConfig
    model: ModelConfig
    stream: StreamConfig
    locator: Locator
    datasets: tuple[str, ...]
    labels_path: str  # the first iteration's pseudo-labels; the next ones come on the board
    n_genes: int
    iteration: int = 0  # the first iteration this run trains
    until: int = 0  # the last one it may train
    init_encoder: str | None = None
    mlflow_run_id: str | None = None  # the run the driver logs each epoch's metrics to
    tracking_uri: str = ""
    final_eval: bool = False  # the loss over every cell, without updates, after the last epoch
    check_replicas: bool = False  # the largest difference between the replicas' parameters
    board: object = None  # a train.board.Board actor: rank 0's progress out, the next pseudo-labels in


def loop_config(
    cfg: RunConfig, locator: Locator, datasets: list[str], labels_path: str | Path, n_genes: int,
    iteration: int = 0, init_encoder: str | None = None, mlflow_run_id: str | None = None,
    final_eval: bool = False, check_replicas: bool = False, until: int | None = None,
) -> WorkerConfig:
    """The :class:`WorkerConfig` of a run of iterations ``iteration`` to ``until`` (by default
    the one)."""
    return WorkerConfig(cfg.pretrain, cfg.model, cfg.stream, locator, tuple(datasets),
                        str(Path(labels_path).resolve()), n_genes, iteration,
                        iteration if until is None else until, init_encoder, mlflow_run_id,
                        cfg.tracking_uri, final_eval, check_replicas)


def train_iterations(cfg: RunConfig, loop_config: WorkerConfig, name: str, bar=None,
                     finished=None) -> tuple[str, list[dict]]:
    """Iterations ``loop_config.iteration`` to ``loop_config.until`` as one Ray Train run; returns
    the last checkpoint's dir and every iteration's final metrics. As an iteration ends,
    ``finished(iteration, checkpoint_dir, metrics)`` is called (from a thread of this process)
    and returns the next iteration's pseudo-labels, or None to stop after this one. Each epoch's
    metrics are logged to ``loop_config.mlflow_run_id`` from here (workers never import MLflow)
    and shown on ``bar``, advanced by one per epoch. An error ``finished`` raises stops the
    workers and is raised here."""
    import threading

    import ray

    if finished is None and loop_config.until > loop_config.iteration:
        raise ValueError("several iterations need `finished` to give each next one's pseudo-labels")
    run_log = RunLog(loop_config.mlflow_run_id, loop_config.tracking_uri)
    if bar is None and run_log.run_id is None and finished is None:  # nothing to hear of: no board
        result = _fit(cfg, loop_config, name)
        return result.checkpoint.path, _records(result)
    board = ray.remote(num_cpus=0)(Board).remote()
    storage = _results_dir(cfg)
    epochs = loop_config.pretrain.epochs
    errors: list[BaseException] = []
    done = threading.Event()

    def show(m: dict) -> None:
        step = m["iteration"] * epochs + m["epoch"]
        for key in ("loss", "pseudo_label_accuracy", "cells_per_second_per_worker"):
            run_log.metric(f"pretrain_{key}", m[key], step=step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(iteration=m["iteration"], loss=f"{m['loss']:.3f}",
                            accuracy=f"{m['pseudo_label_accuracy']:.3f}",
                            cells_s=f"{m['cells_per_second_per_worker'] * m['world']:,.0f}")

    last_recorded = -1

    def handle(event: dict) -> None:
        nonlocal last_recorded
        show(event["epoch"])
        if "iteration" not in event or errors:
            return
        it = event["iteration"]["iteration"]
        if it <= last_recorded:  # trained again by a worker group restarted before it heard
            return
        last_recorded = it
        checkpoint = storage / name / event["iteration"]["checkpoint"]
        board.record.remote(it, str(checkpoint))
        try:
            following = finished(it, str(checkpoint), event["iteration"]["metrics"]) if finished else None
        except BaseException as e:  # the workers stop at the next iteration; raised after the run
            errors.append(e)
            following = None
        # absolute: the workers' current folder is not this process's
        board.post.remote(it + 1, following and str(Path(following).resolve()))

    def follow() -> None:
        while not done.is_set():
            try:
                events = ray.get(board.take.remote())
            except Exception:  # the board went away with the run: nothing more to show
                return
            for event in events:
                handle(event)
            if not events:
                done.wait(0.5)

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    try:
        result = _fit(cfg, replace(loop_config, board=board), name)
    finally:
        done.set()
        watcher.join()
        for event in ray.get(board.take.remote()):  # what came in after the watcher's last look
            handle(event)
        ray.kill(board)
    if errors:
        raise errors[0]
    return result.checkpoint.path, _records(result)


def _results_dir(cfg: RunConfig) -> Path:
    """Where Ray Train keeps the runs' checkpoints (absolute: workers run in other folders)."""
    return (Path(cfg.work_dir) / "ray_results").resolve()


def _records(result) -> list[dict]:
    return result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []


@functools.cache
def _trainer_class():
    """TorchTrainer without two actors that each run starts and stops and this pretraining never
    uses: Ray Data's dataset manager (it passes no Ray Datasets) and the placement-group cleaner
    (its controller is owned by the driver, so its groups end with the driver's job). Where this
    Ray's internals differ, TorchTrainer as it is."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback,
        )
    except ImportError:
        return TorchTrainer
    unused = (DatasetsCallback, PlacementGroupCleanerCallback)

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

    return Trainer


def _fit(cfg: RunConfig, loop_config: WorkerConfig, name: str):
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig

    p = cfg.pretrain
    trainer = _trainer_class()(
        pretrain_loop_per_worker,
        train_loop_config={"worker": loop_config},
        torch_config=TorchConfig(backend="nccl" if p.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=p.num_workers,
            use_gpu=p.use_gpu,
            resources_per_worker={"CPU": p.cpus_per_worker} | ({"GPU": 1} if p.use_gpu else {}) | p.resources_per_worker,
            placement_strategy=p.placement,
        ),
        # a restarted worker group goes on after the last iteration the driver recorded, training
        # the interrupted one again from its start
        run_config=RayRunConfig(
            name=name, storage_path=str(_results_dir(cfg)),
            failure_config=FailureConfig(max_failures=max(0, p.max_failures)),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def pretrain(
    cfg: RunConfig,
    datasets: list[str],
    tag: str = "all",
    mlflow_run_id: str | None = None,
    log=detail,
    resume: bool = True,
) -> PretrainResult:
    """Run iterations of (cluster, train) on ``datasets``; Ray must be initialised. Progress is
    recorded after each iteration's training and each re-clustering; with ``resume`` a rerun in
    the same directory (same ``tag``) continues after the last recorded step, else starts over."""
    t_start = time.perf_counter()
    if not datasets:
        raise ValueError("pretraining needs at least one dataset")
    store = atlas_for(cfg)
    locator = store.locator.pinned()  # every worker and actor reads this same version
    n_genes = locator.atlas().n_genes
    out_dir = Path(cfg.work_dir) / "pretrain" / tag
    # one run per folder: two would write each other's progress and pseudo-labels
    with exclusive(out_dir / ".lock", refuse=lambda e: ConfigError(
            f"another run ({e.holder}) is pretraining these datasets with these settings in {out_dir}; wait for it "
            "to finish (rerunning then reuses or resumes it), or give another --work-dir")):
        if not resume:
            (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
        client = RunLog(mlflow_run_id, cfg.tracking_uri)
        t0 = time.perf_counter()
        # CPU actors stay up between refreshes (start-up paid once); GPU actors are released so
        # that training can have the GPUs
        pool = None if cfg.pseudolabel.use_gpu else KMeansPool(locator, cfg.pseudolabel)
        try:
            return _iterations(cfg, datasets, locator, n_genes, out_dir, tag, pool, client, mlflow_run_id, log,
                               t_start, t0)
        finally:
            if pool is not None:
                pool.close()


def _iterations(cfg, datasets, locator, n_genes, out_dir, tag, pool, client, mlflow_run_id, log, t_start, t0):
    def refresh(version: int, encoder: str | None):
        if pool is not None:
            return pool.refresh(datasets, version, encoder)
        return refresh_pseudo_labels(locator, datasets, cfg.pseudolabel, version, encoder)

    p = cfg.pretrain
    history: list[dict] = []  # one entry per trained iteration
    encoder_path: str | None = None

    def save_progress(it: int, labels_path: Path | None) -> None:
        """After iteration ``it``: its encoder, and the next labels once they are saved."""
        write_json_whole(out_dir / PROGRESS_FILE, {"iteration": it, "encoder_path": encoder_path,
                                                   "labels_path": labels_path and str(labels_path), "history": history})

    def recluster(it: int, previous: PseudoLabels | None) -> tuple[PseudoLabels, Path]:
        """Pseudo-labels v{it + 1} on iteration ``it``'s encoder, scored against v{it} into its
        history entry, saved, then recorded (progress never names a file not yet there)."""
        t0 = time.perf_counter()
        new = refresh(it + 1, encoder_path)
        if previous is not None:
            nmi = agreement(previous, new)
            history[-1].update(cluster_seconds=time.perf_counter() - t0, nmi_mean=nmi["mean"], nmi_min=nmi["min"])
            client.metric("pseudo_label_nmi_mean", nmi["mean"], step=it + 1)
            client.metric("pseudo_label_nmi_min", nmi["min"], step=it + 1)
            log(f"  pseudo-labels v{it + 1} on embeddings: NMI to v{it} mean {nmi['mean']:.3f}, min {nmi['min']:.3f}")
        path = new.save(labels_file(out_dir, new.version))
        save_progress(it, path)
        return new, path

    def stable() -> bool:
        return bool(history) and history[-1].get("nmi_min", -1) >= p.nmi_stop

    state = _read_progress(out_dir, log)
    resumed = None if state is None else int(state["iteration"])
    if state is None:
        labels = refresh(0, None)
        log(f"  pseudo-labels v0 ({labels.space}): {len(datasets)} datasets in {time.perf_counter() - t0:.1f}s")
        labels_path = labels.save(labels_file(out_dir, labels.version))
        it = 0
    else:  # an interrupted run of these datasets and settings: continue after its last iteration
        history, encoder_path, it = state["history"], state["encoder_path"], resumed + 1
        log(f"  resuming after iteration {resumed} ({out_dir / PROGRESS_FILE}): encoder {encoder_path}")
        if state.get("labels_path"):
            labels_path = Path(state["labels_path"])
            labels = PseudoLabels.load(labels_path)
        elif it < p.iterations:  # the crash came between training and re-clustering: do that now
            previous = labels_file(out_dir, resumed)
            labels, labels_path = recluster(resumed, PseudoLabels.load(previous) if previous.exists() else None)
    bar = progress(p.iterations * p.epochs, "pretrain", unit="epoch", initial=it * p.epochs)
    started = time.perf_counter()

    def finished(it: int, ckpt_dir: str, last: dict) -> str | None:
        """Iteration ``it`` is trained: record it, re-cluster on its encoder unless it is the last,
        and give the next iteration's pseudo-labels (None when there is none to train)."""
        nonlocal encoder_path, labels, labels_path, started
        encoder_path = str(Path(ckpt_dir) / ENCODER_FILE)
        history.append({"iteration": it, "train_seconds": time.perf_counter() - started, "loss": last.get("loss"),
                        "pseudo_label_accuracy": last.get("pseudo_label_accuracy"), "checkpoint": ckpt_dir})
        save_progress(it, None)
        log(f"  iteration {it}: loss {history[-1]['loss']:.3f}, pseudo-label accuracy "
            f"{history[-1]['pseudo_label_accuracy']:.3f}, {history[-1]['train_seconds']:.1f}s")
        if it < p.iterations - 1:
            bar.set_description(f"pretrain (iteration {it + 1}/{p.iterations}, re-clustering)")
            labels, labels_path = recluster(it, labels)
        if it + 1 >= p.iterations or stable():
            return None
        bar.set_description(f"pretrain (iteration {it + 2}/{p.iterations})")
        started = time.perf_counter()
        return str(labels_path)

    try:
        while it < p.iterations and not stable():
            # one Ray Train run for the remaining iterations (re-clustered between them while the
            # workers wait), unless K-means runs on GPUs: those the training workers hold
            until = it if cfg.pseudolabel.use_gpu else p.iterations - 1
            worker_config = loop_config(cfg, locator, datasets, labels_path, n_genes, it, encoder_path, mlflow_run_id,
                                        until=until)
            started = time.perf_counter()
            bar.set_description(f"pretrain (iteration {it + 1}/{p.iterations})")
            train_iterations(cfg, worker_config, f"pretrain-{tag}-it{it:02d}", bar, finished)
            if not history or history[-1]["iteration"] < it:
                raise RuntimeError(f"the training run from iteration {it} ended without finishing it")
            it = history[-1]["iteration"] + 1
    finally:
        bar.close()
    stopped_early = stable()
    if stopped_early:
        log(f"  pseudo-labels stable (min NMI >= {p.nmi_stop}); stopping after iteration {history[-1]['iteration']}")
    result = PretrainResult(
        encoder_path=encoder_path, datasets=list(datasets), iterations_run=len(history),
        stopped_early=stopped_early, history=history, seconds=time.perf_counter() - t_start,
        resumed_after_iteration=resumed,
    )
    write_json_whole(out_dir / RESULT_FILE, asdict(result))
    client.artifact(out_dir / RESULT_FILE, "pretrain")
    return result
