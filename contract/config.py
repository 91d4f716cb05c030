"""The config schema: one typed dataclass per section, merged under the root `AdsfmConfig`.

Every YAML file under conf/ is merged onto these dataclasses, so a misspelt key, a wrong type or a choice
outside a field's enum fails when the config is composed, before Ray or any worker starts. Fixed choices are
`StrEnum`s (OmegaConf has no `Literal`): a member compares equal to its string, so `cfg.model.arch == "hstu"`
reads as it looks. Checks that need more than one field (degrees, table names, sizes) live with the layer
that owns them (parallel/config.py, the models) and run in `adsfm.training.job.validate`.

This module sits below every layer (it imports no adsfm code and no torch), so training, export, serving
and launch all read the same schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

T = TypeVar("T")


def typed(schema: type[T], cfg: Any) -> T:
    """`cfg` (a dict, a DictConfig or a dataclass) merged onto `schema`: typed, validated, defaults filled in."""
    return OmegaConf.merge(OmegaConf.structured(schema), cfg)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- choices


class Side(StrEnum):
    """Which side of a ranking request carries a feature."""

    user = "user"
    item = "item"


class Pooling(StrEnum):
    sum = "sum"
    mean = "mean"


class DataSource(StrEnum):
    movielens = "movielens"
    tabular = "tabular"
    synthetic = "synthetic"
    criteo = "criteo"


class Arch(StrEnum):
    """Model architecture (`model.arch`, the manifest's `arch`). dlrm, dcnv2 and logreg score pooled
    embeddings with one dense graph; hstu is a sequence model with split graphs."""

    dlrm = "dlrm"
    dcnv2 = "dcnv2"
    logreg = "logreg"
    hstu = "hstu"


class AttentionKernel(StrEnum):
    """HSTU attention implementation: auto (Triton on CUDA when it imports, else the PyTorch reference)."""

    auto = "auto"
    reference = "reference"
    triton = "triton"


class SparseOptimizer(StrEnum):
    rowwise_adagrad = "rowwise_adagrad"
    adagrad = "adagrad"
    sgd = "sgd"


class DenseOptimizer(StrEnum):
    adam = "adam"
    adagrad = "adagrad"
    sgd = "sgd"


class Precision(StrEnum):
    """Stored precision of an embedding table: fp32, fp16, or int8 row-wise (fp16 scale and bias per row)."""

    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class Backend(StrEnum):
    gloo = "gloo"
    nccl = "nccl"


class TrainPipeline(StrEnum):
    plain = "plain"
    sparse_dist = "sparse_dist"


class DataParallel(StrEnum):
    ddp = "ddp"
    fsdp = "fsdp"


class ShardingType(StrEnum):
    """TorchRec's sharding types, by the names its planner uses."""

    data_parallel = "data_parallel"
    table_wise = "table_wise"
    column_wise = "column_wise"
    table_column_wise = "table_column_wise"
    row_wise = "row_wise"
    table_row_wise = "table_row_wise"
    grid_shard = "grid_shard"


class ComputeKernel(StrEnum):
    fused = "fused"
    dense = "dense"


class GzipSplit(StrEnum):
    striped = "striped"
    whole = "whole"


class StreamReader(StrEnum):
    files = "files"
    ray_data = "ray_data"


class Collision(StrEnum):
    hash = "hash"
    managed = "managed"


class Eviction(StrEnum):
    lru = "lru"
    lfu = "lfu"


class Ingress(StrEnum):
    """Ray Serve ingress of a local cluster (adsfm.contract.cluster says what each is)."""

    auto = "auto"
    haproxy = "haproxy"
    direct = "direct"
    proxy = "proxy"


# -------------------------------------------------------------------------------------------------- data


@dataclass
class SparseFeature:
    """One categorical input, single- or multi-valued, looked up in an embedding table."""

    name: str = "???"
    """Feature name as the model and the serving request see it."""
    column: str | None = None
    """Source column in the data frame; defaults to `name`."""
    table: str | None = None
    """Embedding table; features naming the same table share rows and vocabulary (item_id and history)."""
    multi: bool = False
    """The column holds several values per row: a list, or a string joined by `sep` (a jagged feature)."""
    sep: str = "|"
    """Separator of a multi-valued column given as a string."""
    hash_buckets: int = 0
    """0: build a vocabulary from the training rows; >0: hash raw values into this many rows."""
    min_count: int = 1
    """Values seen fewer times in training map to the out-of-vocabulary row."""
    side: Side = Side.user
    """Which side of a ranking request carries it."""
    pooling: Pooling = Pooling.sum
    """Pooling of a bag; a shared table takes its first feature's pooling."""
    raw: bool = False
    """Integer values used as they are (timestamps of a sequence model): no vocabulary, no table."""


@dataclass
class DenseFeature:
    """One numeric input, standardised with the training rows' mean and std; a missing value is the mean."""

    name: str = "???"
    """Feature name as the model and the serving request see it."""
    column: str | None = None
    """Source column; defaults to `name`."""
    side: Side = Side.user
    log1p: bool = False
    """Apply log1p before standardising (counts, prices); negative values count as 0."""
    missing_indicator: bool = False
    """Also feed the model a 0/1 input `<name>_missing` that says the value was missing."""
    buckets: int = 0
    """Also look the value up in a table of this many quantile buckets (edges from the training rows): a
    sparse feature `<name>_bucket` of the same side, pooled embeddings and DLRM/DCN models only."""


@dataclass
class LabelTask:
    """One task of a multi-task model (`data.labels`): a label made from a column the way `data.label` is."""

    name: str = "???"
    """The task's name: its metrics are `<name>_auc`, ..., its served score `p_<name>` (letters, digits, _)."""
    column: str | None = None
    """Label column; defaults to `data.label`."""
    threshold: float | None = None
    """If set, label = column >= threshold."""
    positive: str | None = None
    """If set, label = (column == this value)."""
    weight: float = 1.0
    """This task's weight in the training loss (a weighted sum of the tasks' log losses)."""


@dataclass
class HistoryConfig:
    """A user's most recent items before each event, built from (user, time, item) columns."""

    length: int = 0
    """How many earlier items to keep; 0 disables the feature."""
    name: str = "history"
    """Name of the generated multi-valued column."""
    positive_name: str | None = None
    """If set, also build a column of earlier items whose label was positive (known at that time)."""
    actions_name: str | None = None
    """If set, also build a column of those events' raw label values (MovieLens: the rating), in step."""
    times_name: str | None = None
    """If set, also build a column of those events' timestamps, in step (a sequence model's time bias)."""
    chronological: bool = False
    """Oldest first (a sequence model reads it in time order); default: most recent first."""


@dataclass
class SyntheticConfig:
    """Zipf-distributed ids for scale and speed work (source=synthetic)."""

    num_samples: int = 100_000
    num_tables: int = 8
    rows: int = 100_000
    pooling_factor: int = 1
    """Values per bag for every table."""
    zipf_alpha: float = 1.1
    num_dense: int = 13
    events_per_user: int = 0
    """> 0: a sequence dataset instead: `users` users, each with this many time-ordered ratings of Zipf-drawn
    items (out of `rows`) that follow the user's latent taste; columns user_id, item_id, rating, timestamp."""
    users: int = 64
    rows_per_user: int = 40
    """Sequence dataset: each user's latest events that become rows; earlier ones are history only."""


@dataclass
class StreamConfig:
    """Criteo-format files read as a stream (source=criteo): nothing is held in memory but one chunk."""

    paths: list[str] = field(default_factory=list)
    """Training files or globs, read in this order: Criteo TSV (plain or .gz) or parquet with the same columns."""
    holdout_paths: list[str] = field(default_factory=list)
    """Holdout files or globs (for the Criteo logs: the last day)."""
    num_dense: int = 13
    """Integer columns after the label (int_0..): log1p, then standardised."""
    num_sparse: int = 26
    """Categorical columns after those (cat_0..): hashed into one table each."""
    hash_buckets: int = 100_000
    """Hash buckets of every categorical table, unless num_embeddings_per_feature is given."""
    num_embeddings_per_feature: list[int] = field(default_factory=list)
    """Hash buckets per categorical column, as TorchRec's Criteo examples take them."""
    item_columns: list[str] = field(default_factory=list)
    """Columns (int_k, cat_k) that describe the ad rather than the user or context: a ranking request sends
    them per candidate and the rest once per request. Training is the same either way; empty: every column
    comes with the user, so the candidates of one request would all score alike."""
    chunk_bytes: int = 8 << 20
    """Bytes parsed at once; memory per worker is a few times this."""
    gzip_split: GzipSplit = GzipSplit.striped
    """How ranks share gzip files, which cannot be entered in the middle. striped: every rank decompresses
    every file and parses every world-th line, so shares are equal to a line per file and every row is
    trained (decompression costs ranks x the bytes); whole: each file goes to one rank, so decompression is
    shared but ranks stop with the smallest share (the unread part is printed before training, and fewer
    files than ranks is an error)."""
    reader: StreamReader = StreamReader.files
    """files: each Ray Train worker reads its own share of the files (the splitting above); ray_data: the
    files are a Ray Data dataset, featurized by the feature contract in `map_batches` on Ray's CPU workers
    (any node) and handed out to the trainers by Ray Train's streaming split (training/ray_data.py). One
    kind of file (TSV, TSV.gz or parquet) per run."""
    stats_rows: int = 100_000
    """Leading training rows that estimate the dense columns' mean and std."""
    holdout_rows: int = 200_000
    """Leading holdout rows kept for evaluation, export parity and the promotion gate."""


@dataclass
class DataConfig:
    """Where the rows come from and how they become features (adsfm.contract.features has the rules)."""

    source: DataSource = DataSource.movielens
    """movielens (MovieLens-100k from the recbole wheel), tabular (a CSV/parquet file), synthetic, or criteo
    (Criteo-format TSV or parquet files, streamed and split across workers; see `stream`)."""
    path: str | None = None
    """CSV or parquet file for source=tabular."""
    label: str = "label"
    """Label column: 0/1 (or any value in [0, 1]), a number compared with `label_threshold`, or a class
    compared with `label_positive`."""
    label_threshold: float | None = None
    """If set, label = column >= threshold (MovieLens: rating >= 4)."""
    label_positive: str | None = None
    """If set, label = (column == this value), for labels given as classes ("yes", "converted", "click")."""
    labels: list[LabelTask] = field(default_factory=list)
    """Two or more tasks, one model head each (pooled models, in-memory sources), e.g. MovieLens
    `like` (rating >= 4) and `love` (rating = 5); empty: one task, `label`. The split, the history and the
    validation slice still use `label`."""
    na_values: list[str] = field(default_factory=list)
    """Strings that also mean "missing" in every column (an empty cell always does), e.g. [NA, NULL]."""
    user_column: str | None = None
    """Column identifying the user: the split and the history are per user."""
    item_column: str | None = None
    """Column identifying the item: history items and the serving item store."""
    time_column: str | None = None
    """Column ordering events (seconds, or dates pandas can parse); without it the split is random."""
    holdout_fraction: float = 0.2
    """Fraction of each user's latest events held out (ties at the boundary stay in training)."""
    dense: list[DenseFeature] = field(default_factory=list)
    sparse: list[SparseFeature] = field(default_factory=list)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    cache_dir: str = "${oc.env:ADSFM_CACHE,${oc.env:HOME}/.cache/adsfm}"
    """Downloads and prepared datasets are kept here, keyed by a fingerprint of this config."""
    seed: int = 0


# ------------------------------------------------------------------------------------------------- model


@dataclass
class SequenceModelConfig:
    """HSTU (model.arch=hstu): which features form the sequence, and the transducer's sizes."""

    history: str = "history"
    """Jagged item feature: the user's earlier items, oldest first (data.history.chronological)."""
    actions: str = "history_rating"
    """Jagged feature in step with `history`: what the user did with each item (its own table)."""
    times: str = "history_time"
    """Raw jagged feature in step with `history`: each event's timestamp (seconds)."""
    item: str = "item_id"
    """The candidate's item feature (shares the item table with `history`)."""
    time: str = "timestamp"
    """Raw feature: the moment of the request (training: the event's own timestamp)."""
    num_layers: int = 2
    num_heads: int = 2
    attention_dim: int = 16
    """Per-head query/key dimension."""
    linear_dim: int = 16
    """Per-head value (and gate) dimension; num_heads * linear_dim is projected back to embedding_dim."""
    position_buckets: int = 64
    """Relative-position bias buckets (distance clamped to this - 1)."""
    time_buckets: int = 16
    """Relative time-gap bias buckets: |dt| in [4^(k-1), 4^k) seconds → bucket k."""
    attention_norm: float = 0.0
    """Attention weights are silu(score) / attention_norm; 0: data.history.length (the longest history)."""
    dropout: float = 0.5
    attention_kernel: AttentionKernel = AttentionKernel.auto
    """The attention implementation; the environment variable ADSFM_HSTU_KERNEL overrides it."""


@dataclass
class TableConfig:
    """How one id table's values find their rows (`model.tables.<table>`, the table as data.sparse names it:
    its `table`, else the feature's name)."""

    collision: Collision = Collision.hash
    """hash: the table data.sparse builds (a vocabulary, or hash_buckets rows, where distinct ids may share
    a row); managed: `size` rows, each held by one id that torchrec's MCHManagedCollisionModule admitted
    while training, with `eviction` freeing rows for new ids; an id no row holds takes the unknown row.
    The id → row remap travels in the bundle and in every delta."""
    size: int = 0
    """managed: the table's managed rows (required), of which size - 1 hold ids (torchrec keeps the last as
    its free-row mark); hash: the hash buckets, in place of data.sparse's hash_buckets (0: as data.sparse says)."""
    eviction: Eviction = Eviction.lru
    """managed: lru (the id unseen longest leaves) or lfu (the id seen least often leaves)."""
    eviction_interval: int = 1
    """managed: training steps between admissions of new ids (torchrec's eviction_interval)."""


@dataclass
class ModelConfig:
    """DLRM (arch=dlrm): embeddings + bottom MLP → pairwise dot interaction → top MLP; DCN-v2 (arch=dcnv2):
    low-rank cross layers over [bottom MLP output, embeddings] → top MLP; logistic regression (arch=logreg):
    one weight per id and per dense value; HSTU (arch=hstu): a sequential transducer over the user's history,
    each candidate attending to it (see `sequence`)."""

    arch: Arch = Arch.dlrm
    embedding_dim: int = 16
    """Dimension of every table (the interactions need one dimension); logreg: ignored (a weight per id)."""
    dense_arch: list[int] = field(default_factory=lambda: [64, 16])
    """Bottom MLP sizes; the last must equal embedding_dim."""
    over_arch: list[int] = field(default_factory=lambda: [128, 64, 1])
    """Top MLP sizes; the last must be 1 (one logit). HSTU: the head over each candidate's output."""
    wide: bool = False
    """dlrm and dcnv2: add a wide (linear) part, one weight per id and per dense value, to the deep logit. The
    weight is 4 more columns of each table (their mean), so the bundle and serving are unchanged."""
    cross_layers: int = 3
    """dcnv2: number of cross layers."""
    cross_rank: int = 16
    """dcnv2: rank of each cross layer's weight (W = U V with U, V of (F+1)·embedding_dim × cross_rank)."""
    sequence: SequenceModelConfig = field(default_factory=SequenceModelConfig)
    tables: dict[str, Any] = field(default_factory=dict)
    """Per id table, a TableConfig: hash or managed collision, e.g. `+model.tables.item={collision:managed,size:4096}`
    (typed when the features are built: OmegaConf cannot merge an override into a dict of dataclasses); a
    table not named here is as data.sparse says."""


# ---------------------------------------------------------------------------------------------- parallel


@dataclass
class TableConstraint:
    """Per-table planner constraints."""

    sharding_types: list[ShardingType] = field(default_factory=list)
    """Allowed sharding types for this table; empty: the layout's global list."""
    compute_kernel: ComputeKernel | None = None
    """fused or dense; None lets the planner choose."""
    column_split: int | None = None
    """Column width of each shard for column_wise sharding."""
    cache_load_factor: float | None = None
    """On CUDA with the fused_uvm_caching kernel: the share of the table's rows cached in GPU memory."""


@dataclass
class ParallelConfig:
    """How the job is laid out over ranks (checked by adsfm.parallel.config.validate_parallel)."""

    name: str = "tw2"
    num_workers: int = 2
    """Ray Train workers, one rank each."""
    backend: Backend = Backend.gloo
    """torch.distributed backend: gloo on CPU, nccl on CUDA."""
    device: Device = Device.cpu
    cpu_per_worker: float = 0.5
    """Ray CPUs per worker. Below 1 on a 2-core host so that other Ray tasks are not starved."""
    sharding_types: list[ShardingType] = field(default_factory=lambda: [ShardingType.table_wise])
    """Sharding types the planner may choose from for every table."""
    column_split: int | None = None
    """Column width of each shard for column-wise types, for tables without their own column_split."""
    memory_per_rank_gb: float | None = None
    """Planner storage limit per rank (GPU memory on CUDA, host memory on CPU); None: the planner's default."""
    tables: dict[str, TableConstraint] = field(default_factory=dict)
    """Per-table constraints, keyed by table name."""
    data_parallel: DataParallel = DataParallel.ddp
    """Dense layers over the "dp" mesh dimension: ddp (replicated, gradients all-reduced) or fsdp (FSDP2
    fully_shard: parameters, gradients and optimizer state sharded). Tensor parallel needs fsdp."""
    sparse_group: int = 0
    """2D sparse parallelism: shard tables within groups of this many ranks and replicate them across the
    num_workers / sparse_group groups (TorchRec's DMPCollection layout), synced every step. 0: one group."""
    dp: int = -1
    """Data-parallel degree of the dense side; -1: the ranks that tp leaves (num_workers / tp)."""
    tp: int = 1
    """Tensor-parallel degree: the blocks each model declares split over tp ranks (DTensor)."""


# ------------------------------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 3
    batch_size: int = 1024
    """Global batch: each of N workers takes batch_size / N rows of every step."""
    max_steps: int = 0
    """Stop after this many steps (0: run all epochs)."""
    sparse_optimizer: SparseOptimizer = SparseOptimizer.rowwise_adagrad
    """Fused into the embedding kernel."""
    sparse_lr: float = 0.05
    dense_optimizer: DenseOptimizer = DenseOptimizer.adam
    dense_lr: float = 0.001
    weight_decay: float = 0.0
    eval_batch_size: int = 4096
    log_every: int = 10
    """Log training loss to MLflow every N steps."""
    seed: int = 0
    progress: bool = True
    """Show a progress bar on rank 0."""
    checkpoint_every: int = 0
    """Also checkpoint every N steps (0: only at the end). A restarted job resumes from the newest one."""
    async_checkpoint: bool = False
    """Write periodic checkpoints in the background (staged to CPU memory first); each is published as soon
    as every rank's write completes."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in the run directory (0: all)."""
    max_failures: int = 1
    """Times Ray Train restarts a failed worker group; each restart resumes from the newest checkpoint."""
    early_stopping: bool = False
    """Hold out `validation_fraction` of the training rows (never the holdout) and judge every epoch by its
    logloss on them: training stops after `patience` epochs without improvement, and the run's checkpoint
    (the one export takes) and reported holdout metrics are the best epoch's. In-memory sources only."""
    validation_fraction: float = 0.1
    """The validation slice: the latest share of each user's training rows where the data has users and
    times, else a random share (seed data.seed)."""
    patience: int = 1
    """Epochs without a better validation logloss before early stopping ends training."""
    baseline: bool = False
    """Also train logistic regression (model=logreg) on the same features, split and epochs, and log
    `holdout_auc_vs_baseline` and `holdout_logloss_vs_baseline` (this model minus the baseline) to MLflow."""
    start_from_baseline: bool = True
    """With train.baseline and a wide part (model.wide, dlrm or dcnv2): train the baseline first and start
    this model from it (its wide weights the baseline's, the deep part's output zero), so it begins where
    the baseline ends. With early stopping that start is judged like an epoch: the exported model is never
    worse on validation than the baseline."""
    pipeline: TrainPipeline = TrainPipeline.plain
    """plain: one step after another. sparse_dist: TorchRec's TrainPipelineSparseDist, which starts the next
    batch's input distribution (the all-to-all of its ids) while this batch's dense step runs; the same
    updates in the same order (tests/distributed/test_equivalence.py). Pooled models (dlrm, dcnv2, logreg),
    ddp dense layouts without tensor parallelism or 2D sparse groups."""
    failure_drill: bool = False
    """Tests only: each worker writes its pid to <run_dir>/workers/rank<N>.pid so a test can kill it."""


# ------------------------------------------------------------------------------------------------ export


@dataclass
class GateConfig:
    """What adsfm-promote checks before it moves the champion alias."""

    auc_margin: float = 0.002
    """The candidate's holdout AUC may be at most this much below the champion's (both measured now)."""
    latency_budget_ms: float = 25.0
    """p99 of scoring 1 user x `latency_candidates` in-process must stay under this; each request is another
    holdout user, so no user-state cache answers it."""
    latency_candidates: int = 100
    latency_requests: int = 200
    min_calibration: float = 0.9
    """Bundles with quantized tables: their calibration (mean predicted / mean observed, on the parity rows)
    must lie within [min_calibration, max_calibration]."""
    max_calibration: float = 1.1
    max_score_shift: float = 0.01
    """Bundles with quantized tables: the mean absolute difference of their probabilities from the fp32 eager
    model's, on the parity rows."""


@dataclass
class ExportConfig:
    """How a checkpoint becomes a registered model."""

    model_name: str = "adsfm-movielens-dlrm"
    """Registered model name in MLflow."""
    precision: Precision = Precision.fp32
    """Embedding table precision in the bundle."""
    table_precision: dict[str, Precision] = field(default_factory=dict)
    """Per-table precision overrides, by table name."""
    parity_tolerance: float = 1e-5
    """fp32 bundles: max abs score (probability) difference allowed against the eager model."""
    auc_margin: float = 0.002
    """Bundles with quantized tables: max holdout AUC drop allowed against the eager fp32 model."""
    parity_rows: int = 0
    """Holdout rows checked for parity (0: all)."""
    opset: int = 18
    """ONNX opset of the dense graph."""
    gate: GateConfig = field(default_factory=GateConfig)


# ------------------------------------------------------------------------------------------------- serve


@dataclass
class ServeConfig:
    """The Ray Serve application."""

    host: str = "127.0.0.1"
    """HTTP bind address; loopback unless you mean to expose it."""
    port: int = 8000
    model_name: str = "${export.model_name}"
    alias: str = "champion"
    """Registry alias the replicas load."""
    num_replicas: int = 1
    """Replicas when not autoscaling."""
    min_replicas: int = 1
    """Autoscaling (when max_replicas > min_replicas): provisioned replicas."""
    max_replicas: int = 1
    """Autoscaling: replicas added on demand up to this many."""
    target_ongoing_requests: float = 8.0
    """Autoscaling: ongoing requests per replica that Ray Serve aims for."""
    max_ongoing_requests: int = 64
    """Ray Serve's default (5) collapses a replica under 32 concurrent clients."""
    max_candidates: int = 2000
    """Requests with more candidates are refused with 422."""
    max_values: int = 1000
    """Values a multi-valued feature may carry in one request; more are refused with 422 naming the field."""
    intra_op_threads: int = 1
    """ONNX Runtime threads per session."""
    reload_interval_s: float = 2.0
    """How often replicas read the registry (aliases and champion/challenger split) and follow it (0: never)."""
    delta_poll_s: float = 0.5
    """How often a replica reads the delta log its champion version is tagged with (adsfm.delta_log, written
    by adsfm-continuous) and applies new deltas; 0: never. The tag is looked up with the registry reads."""
    delta_compact_fraction: float = 0.05
    """A table whose live-delta overlay holds this share of its rows is folded into a local copy of its base
    file (off the request path), so the overlay stays small; 0: never."""
    batch_max_requests: int = 16
    """Concurrent requests whose candidates go through one run of the dense graph (@serve.batch)."""
    batch_wait_ms: float = 1.0
    """How long the first request of a batch waits for others."""
    user_cache_size: int = 10_000
    """Users whose user side (pooled embeddings; a sequence model's encoded history) is kept per replica and
    model version, least recently used out, keyed by a 16-byte hash of the user's values."""
    user_cache_bytes: int = 256 << 20
    """The same cache bounded in bytes (a sequence model's state grows with the history)."""
    item_cache_bytes: int = 64 << 20
    """A DLRM bundle's item store is kept pooled (every item-side feature's embedding, float32) when it fits
    in this many bytes per replica and model version, so a request gathers its candidates in one step; a
    larger store (or 0) gathers and pools each candidate's table rows per request. Deltas re-pool the items
    they touch."""
    access_log: bool = False
    """Ray Serve's per-request access log (off: it costs more than scoring on small hosts)."""
    max_request_bytes: int = 1 << 20
    """Larger request bodies are refused with 413."""
    auth_token: str | None = None
    """If set, /v1/ endpoints need `Authorization: Bearer <token>` (401 otherwise; compared in constant time)."""
    protect_metrics: bool = False
    """With auth_token: /metrics needs the token too."""
    protect_docs: bool = False
    """With auth_token: /docs and /openapi.json need the token too."""
    spillover: str | None = None
    """`NAME@ALIAS` of a lighter registered model that scores the requests arriving while this replica already
    has `spillover_queue` in flight, and answers requests the main model cannot answer by their deadline
    (None: off); its responses name it, and /metrics counts them."""
    spillover_queue: int = 32
    """Requests in flight on a replica above which new ones spill over to `spillover`."""
    sticky_field: str | None = "user_id"
    """User feature whose hash splits users between champion and challenger, so a user stays on one side
    (None: split requests at random by the challenger's share)."""
    deadline_ms: float | None = None
    """Default per-request deadline (a request's own `deadline_ms` overrides it): a late model's answer is
    replaced by the fallback's (the champion for the challenger, else `spillover`). None: no deadline."""
    shadow_log: str | None = None
    """JSON-lines file each replica writes the shadow challenger's answers to (its top 10 and its
    disagreement with the champion), from a background thread, rotated at 16 MiB (3 kept); None: the
    replica's log, at INFO."""
    shadow_rate: float = 1.0
    """Share of the champion's requests the shadow challenger scores a copy of."""
    compare_rate: float = 0.1
    """Share of the requests a challenger answers that the champion scores too, off the request path (within
    shadow_max_in_flight), for adsfm-shift's quality figures: score shift and top-10 disagreement."""
    shadow_max_in_flight: int = 4
    """Shadow copies scored at once per replica; more are skipped (counted), so a slow challenger cannot
    hold the champion's latency."""
    rank_by: str | None = None
    """A multi-task model's ranking score: an expression over the tasks' probabilities `p_<task>` with numbers,
    + - * / ** and parentheses, e.g. "p_like * p_love" or "0.7 * p_like + 0.3 * p_love". None: the first
    task's. Responses carry every task's score and this expression."""


# --------------------------------------------------------------------------------------------- the whole


@dataclass
class ClusterConfig:
    """Which Ray cluster runs the job."""

    address: str | None = None
    """None: start a local cluster on 127.0.0.1 (or join RAY_ADDRESS when set); else a cluster address."""
    num_cpus: int | None = None
    """CPUs of the local cluster (default: all)."""
    serve_ingress: Ingress = Ingress.auto
    """Ray Serve ingress of a local cluster: auto is haproxy when installed, else direct
    (adsfm.contract.cluster says what each is; bench/ingress.py measures them)."""
    log_file: str | None = "${run_dir}/console.log"
    """The full console of adsfm-train/-pipeline/-serve (Ray's and the libraries' INFO lines included);
    the console itself keeps adsfm's lines, progress bars, warnings and errors. None: everything on it."""


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None
    """None: MLFLOW_TRACKING_URI, else a sqlite store under run_root."""
    experiment: str = "adsfm"


@dataclass
class ContinuousConfig:
    """Continuous training (adsfm-continuous): a registered version's checkpoint trained on new event files as
    they land, its changed embedding rows published as deltas that live replicas apply (contract/delta.py)."""

    start_from: str = ""
    """models:/NAME@ALIAS or models:/NAME/VERSION: the version whose checkpoint (its lineage names it) is the
    start, and beside whose bundle precision the deltas are written."""
    source_dir: str = ""
    """Directory where event files land: parquet, the columns of a training frame (features, label, time).
    Read in file-name order (name them by time), each file in data.time_column order. Write each file under
    another name and rename it into place: a file is read once, as it is when first seen."""
    delta_log: str = ""
    """Where deltas are published; empty: <run_dir>/deltas. The registered version is tagged with it."""
    publish_every_s: float = 10.0
    """Seconds between deltas (a delta waits for at least one trained step)."""
    dense_every: int = 0
    """Every n-th delta also carries the dense graph; 0: tables only."""
    max_row_change: float = 10.0
    """Sanity gate: the largest L2 change of one row since the previous delta; a larger one holds the delta back."""
    auc_floor: float = 0.0
    """Sanity gate: the window's progressive AUC (events scored before trained on) must reach this."""
    poll_s: float = 0.5
    """How often the source directory is listed when it has nothing new."""
    idle_exit_s: float = 0.0
    """Publish and stop after this many seconds without a new file; 0: run until stopped."""


@dataclass
class AdsfmConfig:
    """The whole job, composed from conf/."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    continuous: ContinuousConfig = field(default_factory=ContinuousConfig)
    experiment_name: str = "default"
    """Name of the run, also the MLflow run name prefix."""
    run_root: str = "${oc.env:ADSFM_RUNS,runs}"
    """Root of run directories and of the default MLflow store."""
    run_dir: str = "${run_root}/${experiment_name}-${now:%Y%m%d-%H%M%S}"
    """This run's directory: checkpoints, export bundle, plots, summary.json."""


def register_configs() -> None:
    """Register the root schema; conf/config.yaml names it first in its defaults list."""
    ConfigStore.instance().store(name="adsfm_schema", node=AdsfmConfig)


def conf_dir() -> str:
    """ADSFM_CONF, else the conf/ beside the packages (a checkout, where contract/ sits beside conf/, or a
    job's working_dir, where adsfm/ does), else the copy a wheel installs under <prefix>/share/adsfm."""
    import os
    import sys
    from pathlib import Path

    if os.environ.get("ADSFM_CONF"):
        return os.environ["ADSFM_CONF"]
    here = Path(__file__).resolve()
    for root in (here.parents[1], here.parents[2]):
        if (root / "conf" / "config.yaml").is_file():
            return str(root / "conf")
    return str(Path(sys.prefix) / "share" / "adsfm" / "conf")


def compose(overrides: list[str] | None = None) -> AdsfmConfig:
    """The composed config, as `adsfm-train <overrides>` would see it (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return as_config(hydra_compose(config_name="config", overrides=overrides or [], return_hydra_config=False))


def as_config(cfg: Any) -> AdsfmConfig:
    """The composed config on the typed schema (a misspelt key fails here), with run_dir made absolute:
    `${now:...}` resolves once, here, so every process of the job sees the same directory."""
    from pathlib import Path

    merged = typed(AdsfmConfig, cfg)
    merged.run_dir = str(Path(merged.run_dir).resolve())
    return merged


def to_plain(cfg: Any) -> dict[str, Any]:
    """A resolved config (or section) as plain JSON-able containers, enums as their strings."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg) if not OmegaConf.is_config(cfg) else cfg, resolve=True,
                                 enum_to_str=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
