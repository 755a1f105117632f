"""Typed run configuration: one frozen dataclass per stage, nested in a RunConfig.

Configs come from a recipe (``recipes.py``), optionally a TOML/YAML file, then
``section.key=value`` overrides from the command line, in that order. Every setting's range or
choices are declared beside it (:func:`setting`) and checked when a section is built, so a bad
value is refused before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

import tomllib


class UserError(ValueError):
    """Something the user gave (an argument, a setting, a file, a store, a request) that cannot
    be used; the message says which input, what is wrong and what to do. The CLI exits 2."""


class ConfigError(UserError):
    """A configuration file, override or command-line value that cannot be applied."""


# Choices of the settings that name a mode; the modules that implement them import these.
PHASE1_SPACES = ("expression", "pca", "raw")
HEAD_ACTIVATIONS = ("none", "sigmoid")
SYNC_DTYPES = ("float32", "bfloat16")
ENCODER_SHARDINGS = ("genes", "none")
HEAD_LAYOUTS = ("auto", "block", "padded")
LOADERS = ("memory", "stream")
CLASS_WEIGHTS = ("none", "sqrt", "balanced")
STORE_BACKENDS = ("auto", "soma", "zarr", "experiment")
# a Ray address of this form is a cluster's job-submission endpoint (its dashboard), not a
# cluster for ray.init to join
JOB_ADDRESS_PREFIXES = ("http://", "https://")
# Ray's placement-group strategies for the training workers
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
FOLD_SCHEMES = ("grouped", "per_target")  # or a number of folds
KMEANS_ENGINES = ("auto", "blas", "faiss", "torch")


def setting(default, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, choices: tuple | None = None, nonempty: bool = False):
    """A config field with its allowed range: bounds (``ge``/``gt``/``le``/``lt``) or ``choices``
    apply to the value, or to every item of a tuple; ``nonempty`` refuses an empty tuple or string."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt,
                                            "choices": choices, "nonempty": nonempty})


def _bound_problem(value, m: dict) -> str | None:
    if m["choices"] is not None and value not in m["choices"]:
        return f"use one of {', '.join(map(str, m['choices']))}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            if m[key] is not None and not ok(value, m[key]):
                return f"must be {word} {m[key]}"
    return None


class _Checked:
    """Checks every :func:`setting` of a section when it is built (recipes, files, overrides)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            m = f.metadata
            if not m:
                continue
            value = getattr(self, f.name)
            where = f"{self.SECTION}.{f.name}" if self.SECTION else f.name
            if m["nonempty"] and len(value) == 0:
                raise ConfigError(f"{where} is empty; give at least one value")
            for v in value if isinstance(value, tuple) else (value,):
                problem = _bound_problem(v, m)
                if problem:
                    raise ConfigError(f"{where} = {value!r}: {problem}")
        self.check()

    def check(self) -> None:
        """Checks across settings of the section (none by default)."""


@dataclass(frozen=True)
class DemoDataConfig(_Checked):
    """Synthetic multi-dataset atlas (``scpretrain demo-data``)."""

    SECTION: ClassVar[str] = "demo"
    n_datasets: int = setting(4, ge=1)
    cells_per_dataset: int = setting(600, ge=1)
    n_genes: int = setting(2000, ge=2)
    n_types: int = setting(6, ge=1)
    markers_per_type: int = setting(40, ge=1)
    genes_kept: float = setting(0.85, gt=0, le=1)  # fraction of the atlas genes each dataset measures
    seed: int = setting(0, ge=0)
    # > 0: an atlas of this many cells over n_datasets datasets of uneven (log-normal) sizes,
    # streamed into the store block by block instead of written as .h5ad files
    n_cells: int = setting(0, ge=0)
    # each dataset's mean reads per cell is drawn log-uniformly from this range (cells vary
    # around it); about 0.6 distinct genes per read at these depths
    min_reads: int = setting(500, ge=1)
    max_reads: int = setting(3000, ge=1)

    def check(self) -> None:
        if self.min_reads > self.max_reads:
            raise ConfigError(f"demo.min_reads = {self.min_reads} is above demo.max_reads = {self.max_reads}; "
                              "give a range low to high")


@dataclass(frozen=True)
class StoreConfig(_Checked):
    """Where the atlas lives and in which backend. ``uri`` empty means ``<work_dir>/atlas.soma``
    (``atlas.zarr`` for the zarr backend); ``auto`` picks zarr for a ``.zarr`` path or an existing
    zarr atlas, else TileDB-SOMA."""

    SECTION: ClassVar[str] = "store"
    uri: str = ""
    backend: str = setting("auto", choices=STORE_BACKENDS)
    # backend "experiment": any SOMA experiment (the CELLxGENE Census, tiledbsoma.io.from_h5ad's)
    # read in place, its columns named here; its index is cached under <work_dir>/atlas-index
    dataset_column: str = "dataset_id"
    label_column: str = "cell_type"
    gene_column: str = "feature_name"
    measurement: str = "RNA"
    layer: str = "raw"
    value_filter: str = ""  # an obs filter, e.g. "is_primary_data == True and tissue_general == 'blood'"
    value_type: str = setting("auto", choices=("auto", "counts", "lognorm", "log2norm"))
    # where `annotate` puts an experiment's annotations: "sidecar" (a SOMA DataFrame per model
    # version beside the index, the experiment untouched) or "experiment" (two obs columns per
    # model version added to the experiment itself and the embedding under obsm: needs write
    # access; no other column's values change)
    annotations: str = setting("sidecar", choices=("sidecar", "experiment"))


@dataclass(frozen=True)
class PseudoLabelConfig(_Checked):
    """Per-dataset K-means pseudo-labels: one partition per mean cluster size."""

    SECTION: ClassVar[str] = "pseudolabel"
    cluster_sizes: tuple[int, ...] = setting((50, 100, 200), ge=1, nonempty=True)
    min_k: int = setting(2, ge=1)
    # At most niter Lloyd iterations; a partition stops at its fixed point (an update that
    # leaves its centroids unchanged), with the same result as running on.
    niter: int = setting(30, ge=1)
    # Space of the first clustering: "expression" (normalised expression, the paper),
    # "pca" (a PCA projection of it, faster), or "raw" (raw counts, the original code).
    phase1_space: str = setting("expression", choices=PHASE1_SPACES)
    pca_dims: int = setting(50, ge=1)
    # The PCA runs on this many genes of highest variance in the dataset (all if fewer; 2000 as
    # Seurat and scanpy's tutorials choose), and is fitted on a seeded sample of at most
    # pca_fit_cells cells.
    pca_genes: int = setting(2000, ge=1)
    pca_fit_cells: int = setting(10_000, ge=1)
    num_actors: int = setting(2, ge=1)
    cpus_per_actor: float = setting(0.5, gt=0)
    use_gpu: bool = False  # K-means on a GPU per actor (faiss-gpu, the [gpu] extra, else torch)
    # The K-means engine (pseudolabel/kmeans.py): "auto" (on CPUs the one measured fastest here,
    # on GPUs faiss-gpu where installed, else torch), "blas", "faiss" or "torch"
    engine: str = setting("auto", choices=KMEANS_ENGINES)
    seed: int = setting(0, ge=0)
    # A dataset with more cells than this is clustered by sharded Lloyd iterations across all
    # actors (each reads and featurises its own rows; the driver reduces the sums).
    shard_threshold_cells: int = setting(200_000, ge=1)
    # k-means++ (and the PCA of phase1_space="pca") run on a seeded sample of at most this
    # many cells of a dataset; at or below it, on all of them.
    init_sample_cells: int = setting(100_000, ge=1)
    # Each actor keeps the normalised cells it read (compact CSR over the atlas genes, up to this
    # many bytes) and is sent the same datasets at the next refresh: the embedding refreshes of
    # a pretraining run embed them from memory instead of reading the store (a first phase in
    # the "expression" or "pca" space fills the cache too; "raw" does not).
    cache_bytes: int = setting(2 << 30, ge=0)
    # An actor that dies (a native crash, a lost node) is restarted and its tasks run again, at
    # most this many times per actor; a dataset split over the actors is clustered again from
    # its start when one of them lost its slice. Past that, the refresh fails.
    actor_restarts: int = setting(2, ge=0)


@dataclass(frozen=True)
class ModelConfig(_Checked):
    """Encoder and heads. ``head_activation="sigmoid"`` reproduces the original code."""

    SECTION: ClassVar[str] = "model"
    embedding_dim: int = setting(200, ge=1)
    hidden_dim: int = setting(100, ge=1)
    head_activation: str = setting("none", choices=HEAD_ACTIVATIONS)


@dataclass(frozen=True)
class PretrainConfig(_Checked):
    """Multi-task pretraining: iterations of (cluster, train ``epochs``)."""

    SECTION: ClassVar[str] = "pretrain"
    iterations: int = setting(10, ge=1)
    epochs: int = setting(50, ge=1)
    batch_size: int = setting(256, ge=1)
    lr: float = setting(1e-4, gt=0)
    # Stop early once every partition's NMI between consecutive pseudo-labels exceeds this
    # (pseudo-labels have stopped changing); ``iterations`` is the maximum. Above 1: never stop.
    nmi_stop: float = setting(0.95, ge=0)
    num_workers: int = setting(2, ge=1)
    cpus_per_worker: float = setting(0.5, gt=0)
    use_gpu: bool = False
    # Where the training workers go on a cluster: "PACK" fills a node first, "SPREAD" puts them
    # on different nodes where it can ("STRICT_*": must, or the run waits). With
    # resources_per_worker (custom Ray resources, e.g. {"memory" = 8e9, "a100" = 1}) each worker
    # also asks for those, on top of cpus_per_worker and one GPU with use_gpu. Neither changes
    # what is computed, so neither is in the encoder's cache key.
    placement: str = setting("PACK", choices=PLACEMENTS)
    resources_per_worker: dict = field(default_factory=dict)
    seed: int = setting(0, ge=0)
    # Datasets left out of pretraining (the held-out targets of leave-one-dataset-out).
    exclude_datasets: tuple[str, ...] = ()
    # Sparse updates: the encoder and heads get gradients over the rows a batch touched only
    # (genes present, heads of its datasets), stepped by lazy Adam (train/optim.py) and
    # averaged across workers by an all-reduce of the touched rows (train/parallel.py).
    # false: dense gradients, torch Adam and DDP's dense all-reduce.
    sparse_updates: bool = True
    # The all-reduce of the touched rows across workers sends "float32" (exact) or "bfloat16"
    # values (half the bytes; each worker's gradient rounded to 8 significant bits, as DDP's
    # bf16 compression hook does). Only with sparse_updates and more than one worker.
    gradient_sync_dtype: str = setting("float32", choices=SYNC_DTYPES)
    # With more than one CPU worker and sparse_updates: "genes" shards the encoder's rows over
    # the workers by gene (each steps its own rows; the workers exchange their sparse batches
    # and cells x dim products instead of gradient rows, train/parallel.py); "none" keeps a
    # whole encoder on every worker, averaged by the all-reduce of the touched rows.
    encoder_sharding: str = setting("genes", choices=ENCODER_SHARDINGS)
    # Head layout per batch: "auto", "block" (cells x gathered rows) or "padded" (cells x k_max).
    head_layout: str = setting("auto", choices=HEAD_LAYOUTS)
    # How a worker gets its cells: "memory" reads its whole shard up front; "stream" reads it
    # buffer by buffer with bounded memory (settings in [stream]), for atlases of any size.
    loader: str = setting("memory", choices=LOADERS)
    # A training worker that dies (a native crash, a lost node) makes a new worker group that
    # trains the iteration it was in again from its start, at most this many times per Ray Train
    # run (one per pretraining); past that the run stops, and rerunning the command resumes it
    # after its last finished step.
    max_failures: int = setting(2, ge=0)

    def check(self) -> None:
        if not isinstance(self.resources_per_worker, dict):
            raise ConfigError(f"pretrain.resources_per_worker = {self.resources_per_worker!r}: expected a table of "
                              'resource names and amounts, e.g. {memory = 8e9, a100 = 1}')
        for name, amount in self.resources_per_worker.items():
            if name in ("CPU", "GPU"):
                raise ConfigError(f"pretrain.resources_per_worker: set {name} with pretrain."
                                  f"{'cpus_per_worker' if name == 'CPU' else 'use_gpu'} instead")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount < 0:
                raise ConfigError(f"pretrain.resources_per_worker.{name} = {amount!r}: must be a number >= 0")


@dataclass(frozen=True)
class StreamConfig(_Checked):
    """The streaming loader (``pretrain.loader = "stream"``, ``scpretrain bench loader``)."""

    SECTION: ClassVar[str] = "stream"
    chunk_cells: int = setting(512, ge=1)  # consecutive cells read together (cheap I/O); shards are made of chunks
    buffer_cells: int = setting(32768, ge=1)  # cells shuffled together: 64 chunks, so batches mix datasets
    prefetch_buffers: int = setting(1, ge=0)  # buffers read ahead on a background thread
    # Keep the worker's shard in memory as compact CSR after the first epoch when it fits in
    # this many bytes; later epochs then run from memory. 0: always stream.
    cache_bytes: int = setting(2 << 30, ge=0)


@dataclass(frozen=True)
class FinetuneConfig(_Checked):
    """Supervised fine-tuning of encoder -> sigmoid -> 100 -> sigmoid -> n_types."""

    SECTION: ClassVar[str] = "finetune"
    lr: float = setting(2e-3, gt=0)
    # learning rate of the (pretrained) encoder; 0 means ``lr`` as in the paper. A smaller one
    # keeps more of what pretraining learnt (discriminative fine-tuning).
    encoder_lr: float = setting(0.0, ge=0)
    max_epochs: int = setting(300, ge=1)
    patience: int = setting(20, ge=1)
    batch_size: int = setting(64, ge=1)
    # torch intra-op threads of a fine-tuning run (0: torch's own count, all cores). Its steps are
    # small matrix products: on an idle 2-core machine two threads ran 1.5x faster than one, but
    # beside one or two busy processes, threads waiting on each other ran 1.9x and 4.4x slower
    # (`scpretrain bench finetune`, docs/benchmarks.md): set 1 on a shared or busy machine
    threads: int = setting(0, ge=0)
    # 0: the model reads every gene of its training cells (the paper). N: only a panel of the N
    # genes that best tell the training cells' types apart (train.finetune.gene_panel); the
    # other genes' first-layer rows are zero, and a registered model keeps only the panel, so
    # annotating with it reads and multiplies fewer values (docs/annotation.md)
    gene_panel: int = setting(0, ge=0)
    # an epoch is at least this many steps (small label budgets go round their cells several
    # times), so patience means the same amount of training whatever the budget
    min_steps_per_epoch: int = setting(16, ge=1)
    # >1: the model is the mean of the weights of this many best epochs (by validation accuracy,
    # then loss) instead of the single best epoch (1, the paper)
    snapshots: int = setting(1, ge=1)
    # probability of zeroing each measured value of a training cell, per step (0: none, the paper)
    input_dropout: float = setting(0.0, ge=0, lt=1)
    # cross-entropy weight of each class, from its share of the training cells: "none" (the
    # paper), "sqrt" (1/sqrt(share)) or "balanced" (1/share), scaled to a cell-weighted mean of 1;
    # (the semi-supervised objective weighs each reference cell by it too: ``ssl_class_weight``)
    class_weight: str = setting("none", choices=CLASS_WEIGHTS)
    # pool the network with a one-vs-rest logistic regression over the genes scaled to unit
    # variance (the kind of model CellTypist fits), weighted 0 to 0.5 as fits the validation
    # cells best (train.finetune.fit_gene_model); it ranks cells of types with one or two
    # training cells better. Each dataset (or served request) is called with it only where its
    # calls agree with the network's about as often as on the validation cells
    # (model.networks.CellTypeClassifier.check_gene_model). Off: the network alone (the
    # paper); on in the real-data recipes
    gene_model: bool = False
    # Semi-supervised fine-tuning on an unlabelled query (scNym's recipe; only methods given
    # unlabelled cells use these): MixMatch (guessed query labels sharpened at this temperature,
    # mixup with Beta(alpha, alpha) between reference and query cells) and a domain adversary
    # on the embedding behind a gradient reversal; both weights ramp up over the first epochs.
    unsup_weight: float = setting(1.0, ge=0)
    domain_weight: float = setting(0.1, ge=0)
    mixup_alpha: float = setting(0.3, gt=0)
    sharpen_temperature: float = setting(0.5, gt=0)
    ssl_rampup_epochs: int = setting(20, ge=0)
    # input dropout of the augmentations when input_dropout is 0
    ssl_augment_dropout: float = setting(0.1, ge=0, lt=1)
    # each reference cell of the semi-supervised objective weighs as its type does in
    # ``class_weight`` (false: unweighted, as scNym; unweighted, pbmc3k's rare dendritic cells
    # lost their query cells to monocytes)
    ssl_class_weight: bool = True
    # the guesses are aligned to the query's type mix (estimated by EM on the supervised model's
    # calibrated calls) with this exponent on (query mix / training prior): 1 full, 0 none (the
    # half-way 0.5: full alignment followed EM's under-count of a query's CD8 T cells)
    ssl_align_strength: float = setting(0.5, ge=0, le=1)
    # guesses below this confidence add no consistency loss (0: all count)
    ssl_min_confidence: float = setting(0.9, ge=0, lt=1)
    # The guard (no query labels): the supervised model, same cells and seed, replaces the
    # semi-supervised one when the latter loses more than ``ssl_guard_val_drop`` reference
    # validation accuracy, keeps less than ``ssl_guard_retention`` of the query cells of some type
    # (with at least ``ssl_guard_min_cells`` of them) that the supervised model calls with
    # calibrated confidence >= ``ssl_guard_confidence``, agrees on fewer than
    # ``ssl_guard_agreement`` of all those cells, or its calls' type mix is further from the
    # query's EM-estimated mix than the supervised calls' by more than ``ssl_guard_mix_shift``,
    # or than a mix counted on that many query cells strays by chance where that is less
    # (train.finetune.mix_margin)
    ssl_guard: bool = True
    ssl_guard_val_drop: float = setting(0.02, ge=0, le=1)
    ssl_guard_confidence: float = setting(0.9, ge=0, le=1)
    ssl_guard_retention: float = setting(0.5, ge=0, le=1)
    ssl_guard_min_cells: int = setting(5, ge=1)
    ssl_guard_agreement: float = setting(0.9, ge=0, le=1)
    ssl_guard_mix_shift: float = setting(0.05, ge=0, le=1)
    # Unknown cells: the annotator calls a cell ``unassigned`` when its ``reject_score`` is below
    # the threshold that rejects this fraction of the validation cells (0: never rejects); both
    # are stored in the model. Scores (model.networks.known_type_score): "energy" (T log sum exp
    # of the logits / T; separates held-out types best, docs/evaluation.md) or "confidence" (the
    # log-odds of the calibrated confidence)
    reject_rate: float = setting(0.01, ge=0, lt=1)
    reject_score: str = setting("energy", choices=("energy", "confidence"))
    unassigned: str = setting("Unassigned", nonempty=True)
    train_frac: float = setting(0.6, gt=0, lt=1)
    val_frac: float = setting(0.1, gt=0, lt=1)
    train_cap: int = setting(1000, ge=1)
    seeds: tuple[int, ...] = setting((0, 1, 2), ge=0, nonempty=True)

    def check(self) -> None:
        if self.train_frac + self.val_frac >= 1:
            raise ConfigError(f"finetune.train_frac + finetune.val_frac = {self.train_frac + self.val_frac:g} "
                              "leaves no test cells; keep their sum below 1 (the paper: 0.6 + 0.1)")


@dataclass(frozen=True)
class EvaluateConfig(_Checked):
    """Which labelled datasets are held out and fine-tuned on (empty: every labelled one)."""

    SECTION: ClassVar[str] = "evaluate"
    targets: tuple[str, ...] = ()
    group: str = ""  # catalog group whose labelled datasets are the targets (e.g. "pbmc")
    # "grouped": one pretraining without every target serves them all; "per_target": one
    # pretraining per target, without just that target (the strict leave-one-dataset-out);
    # a number N: N folds, each pretrained without its own targets only
    folds: str = "grouped"
    methods: tuple[str, ...] = setting((
        "scpretrain", "no_pretrain", "logreg",
        "emb_rf", "emb_logreg", "emb_svm", "pca_rf", "pca_logreg", "pca_svm",
        "scpretrain_ssl",  # transfer only (it learns from the unlabelled query too)
        "celltypist",  # where installed (the bench extra); skipped with a note otherwise
    ), nonempty=True)
    # labelled training cells per fine-tuning; the largest is the paper's protocol (capped at
    # min(budget, 0.6 n)); the smaller ones are stratified subsets of its training cells
    budgets: tuple[int, ...] = setting((25, 50, 100, 250, 1000), ge=1)
    # methods run at every budget (the networks always are); the rest at the largest only
    sweep_methods: tuple[str, ...] = ("logreg",)
    cluster: bool = True  # K-means on embeddings vs UMAP of PCA (Rand index, ARI)
    figures: bool = True
    # transfer protocol: fine-tune on the references, predict the queries
    references: tuple[str, ...] = ()
    queries: tuple[str, ...] = ()
    label_mapping: str = ""  # JSON {dataset: {label: shared label or null}}
    # transfer: also score every method after re-weighting its query probabilities to the
    # query's class mix, estimated by EM on the unlabelled query (rows "<method>+shift")
    label_shift: bool = True

    def check(self) -> None:
        if self.folds not in FOLD_SCHEMES and not (self.folds.isdigit() and int(self.folds) >= 1):
            raise ConfigError(f"evaluate.folds = {self.folds!r}: use grouped, per_target or a number of folds >= 1")


@dataclass(frozen=True)
class AnnotateConfig(_Checked):
    """Batch annotation (``scpretrain annotate``): blocks of cells streamed through a pool of
    Ray actors that each load the model once. ``workers = 0`` runs in this process."""

    SECTION: ClassVar[str] = "annotate"
    block_size: int = setting(8192, ge=1)
    workers: int = setting(2, ge=0)
    cpus_per_worker: float = setting(0.5, gt=0)
    # In this process (no actor pool): threads predicting blocks while this one reads the next;
    # 0: one per CPU the process may run on, at most 8, each thread's torch products on CPUs /
    # threads cores (blocks predicted side by side, numpy's one-core steps included, rather than
    # one block's product spread over every core).
    threads: int = setting(0, ge=0)
    # Without --workers, the actor pool is used only with a Ray cluster to spread over (ray.address,
    # RAY_ADDRESS, or a running Ray) and for jobs of at least this many cells; else in-process.
    ray_min_cells: int = setting(50_000, ge=0)
    # A worker that dies (a native crash, a lost node) is restarted, loading the model again, and
    # its blocks run again, at most this many times per worker. A block is written only after it
    # finishes, so running one again writes nothing twice. 0: the first death stops the run.
    worker_restarts: int = setting(2, ge=0)


@dataclass(frozen=True)
class TrackingConfig(_Checked):
    """MLflow. ``tracking_uri`` empty means sqlite + local artifacts under the work dir."""

    SECTION: ClassVar[str] = "tracking"
    tracking_uri: str = ""
    experiment: str = setting("scpretrain", nonempty=True)
    registered_model: str = setting("scpretrain-annotator", nonempty=True)
    alias: str = setting("champion", nonempty=True)

    def check(self) -> None:
        # MLflow's rules for aliases: word characters and '-', and not a version reference
        if not re.fullmatch(r"[\w\-]+", self.alias) or self.alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", self.alias):
            raise ConfigError(f"tracking.alias = {self.alias!r}: use letters, digits, '_' and '-' "
                              "(not 'latest' or 'v<number>', which MLflow reserves)")


@dataclass(frozen=True)
class RayConfig(_Checked):
    """Ray cluster. ``address`` empty starts a local Ray (its temp files under a short path)."""

    SECTION: ClassVar[str] = "ray"
    address: str = ""
    # Logical CPUs for a local Ray. More than the physical cores so that train workers,
    # K-means actors and Ray's own tasks never starve each other on a small machine.
    num_cpus: int = setting(0, ge=0)


@dataclass(frozen=True)
class RunConfig(_Checked):
    work_dir: str = setting("scpretrain_work", nonempty=True)
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    pseudolabel: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def check(self) -> None:
        # TileDB cannot open arrays under paths with control characters (a tab, a newline)
        for name, value in (("work_dir", self.work_dir), ("store.uri", self.store.uri)):
            bad = sorted({repr(c) for c in value if ord(c) < 32 or ord(c) == 127})
            if bad:
                raise ConfigError(f"{name} {value!r} holds the control character(s) {', '.join(bad)}, which the "
                                  "atlas store cannot address; choose a path without them")

    @property
    def store_uri(self) -> str:
        """Absolute: Ray workers and actors run in other working directories."""
        uri = self.store.uri or str(Path(self.work_dir) / ("atlas.zarr" if self.store.backend == "zarr" else "atlas.soma"))
        return uri if "://" in uri else str(Path(uri).resolve())

    @property
    def tracking_uri(self) -> str:
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        return f"sqlite:///{(Path(self.work_dir) / 'mlflow.db').resolve()}"

    @property
    def artifact_location(self) -> str:
        return (Path(self.work_dir) / "mlartifacts").resolve().as_uri()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = getattr(annotation, "__origin__", None)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of settings, got {value!r}")
        return _build(annotation, value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = annotation.__args__
        return tuple(_coerce(v, item_type, where) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0"}:
            return value.lower() in {"true", "1"}
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if annotation is str:
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join((where + '.' if where else '') + u for u in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {
        k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()
    }
    return cls(**kwargs)


def merge(config: RunConfig, updates: dict[str, Any]) -> RunConfig:
    """Deep-merge a nested dict of settings into ``config`` (validated, typed)."""
    base = config.to_dict()

    def deep(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = deep(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return out

    return _build(RunConfig, deep(base, updates))


def parse_override(text: str) -> dict[str, Any]:
    """``pretrain.epochs=5`` -> ``{"pretrain": {"epochs": 5}}`` (values parsed as TOML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in {".yaml", ".yml"}:
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of sections")
    return data


def resolve(
    base: RunConfig, file: str | Path | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Recipe, then file, then command-line overrides."""
    config = base
    if file:
        config = merge(config, load_file(file))
    for o in overrides or []:
        config = merge(config, parse_override(o))
    return config
