"""Typed config schemas for data, model and training, and the root schema registered with Hydra.

Every YAML file under conf/ is merged onto these dataclasses, so a misspelt key or a wrong type fails when
the config is composed, before Ray or any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from export.config import ExportConfig
from parallel.config import ParallelConfig
from serving.config import ServeConfig


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
    """The column holds several values per row, joined by `sep` (a jagged feature)."""
    sep: str = "|"
    """Separator of a multi-valued column."""
    hash_buckets: int = 0
    """0: build a vocabulary from the training rows; >0: hash raw values into this many rows (+1 OOV row)."""
    min_count: int = 1
    """Values seen fewer times in training map to the out-of-vocabulary row 0."""
    side: str = "user"
    """'user' or 'item': which side of a ranking request carries it."""
    pooling: str = "sum"
    """'sum' or 'mean' pooling of a bag; a shared table takes its first feature's pooling."""
    raw: bool = False
    """Integer values used as they are (timestamps of a sequence model): no vocabulary, no table."""


@dataclass
class DenseFeature:
    """One numeric input, standardised with the training rows' mean and std."""

    name: str = "???"
    """Feature name as the model and the serving request see it."""
    column: str | None = None
    """Source column; defaults to `name`."""
    side: str = "user"
    """'user' or 'item'."""
    log1p: bool = False
    """Apply log1p before standardising (counts, prices)."""


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
    """Rows of every categorical table (+1 reserved row), unless num_embeddings_per_feature is given."""
    num_embeddings_per_feature: list[int] = field(default_factory=list)
    """Hash buckets per categorical column, as TorchRec's Criteo examples take them."""
    chunk_bytes: int = 8 << 20
    """Bytes parsed at once; memory per worker is a few times this."""
    stats_rows: int = 100_000
    """Leading training rows that estimate the dense columns' mean and std."""
    holdout_rows: int = 200_000
    """Leading holdout rows kept for evaluation, export parity and the promotion gate."""


@dataclass
class DataConfig:
    """Where the rows come from and how they become features."""

    source: str = "movielens"
    """'movielens' (MovieLens-100k from the recbole wheel), 'tabular' (a CSV/parquet file), 'synthetic', or
    'criteo' (Criteo-format TSV or parquet files, streamed and split across workers; see `stream`)."""
    path: str | None = None
    """CSV or parquet file for source=tabular."""
    label: str = "label"
    """Label column (0/1), or the column compared with `label_threshold`."""
    label_threshold: float | None = None
    """If set, label = column >= threshold (MovieLens: rating >= 4)."""
    user_column: str | None = None
    """Column identifying the user: the split and the history are per user."""
    item_column: str | None = None
    """Column identifying the item: history items and the serving item store."""
    time_column: str | None = None
    """Column ordering events; without it the split is random."""
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


@dataclass
class SequenceModelConfig:
    """HSTU (model.name=hstu): which features form the sequence, and the transducer's sizes."""

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


@dataclass
class ModelConfig:
    """DLRM (name=dlrm): embeddings + bottom MLP → pairwise dot interaction → top MLP; HSTU (name=hstu): a
    sequential transducer over the user's history, each candidate attending to it (see `sequence`)."""

    name: str = "dlrm"
    """'dlrm' or 'hstu'."""
    embedding_dim: int = 16
    """Dimension of every table (the dot interaction needs one dimension)."""
    dense_arch: list[int] = field(default_factory=lambda: [64, 16])
    """Bottom MLP sizes; the last must equal embedding_dim."""
    over_arch: list[int] = field(default_factory=lambda: [128, 64, 1])
    """Top MLP sizes; the last must be 1 (one logit). HSTU: the head over each candidate's output."""
    sequence: SequenceModelConfig = field(default_factory=SequenceModelConfig)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 3
    batch_size: int = 1024
    """Global batch: each of N workers takes batch_size / N rows of every step."""
    max_steps: int = 0
    """Stop after this many steps (0: run all epochs)."""
    sparse_optimizer: str = "rowwise_adagrad"
    """Fused into the embedding kernel: 'rowwise_adagrad', 'adagrad' or 'sgd'."""
    sparse_lr: float = 0.05
    dense_optimizer: str = "adam"
    """'adam', 'adagrad' or 'sgd'."""
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
    """Write periodic checkpoints in the background (staged to CPU memory first); each is published once
    complete, by the next checkpoint or the end of training."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in the run directory (0: all)."""
    max_failures: int = 1
    """Times Ray Train restarts a failed worker group; each restart resumes from the newest checkpoint."""


@dataclass
class ClusterConfig:
    """Which Ray cluster runs the job."""

    address: str | None = None
    """None: start a local cluster on 127.0.0.1 (or join RAY_ADDRESS when set); else a cluster address."""
    num_cpus: int | None = None
    """CPUs of the local cluster (default: all)."""
    serve_ingress: str = "auto"
    """Ray Serve ingress of a local cluster: haproxy, direct, proxy, or auto (haproxy when installed, else
    direct); serving/ingress.py says what each is and bench/ingress.py measures them."""


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None
    """None: MLFLOW_TRACKING_URI, else a sqlite store under run_root."""
    experiment: str = "adsfm"


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
    """ADSFM_CONF, else conf/ of this checkout, else the copy a wheel installs under <prefix>/share/adsfm."""
    import os
    import sys
    from pathlib import Path

    if os.environ.get("ADSFM_CONF"):
        return os.environ["ADSFM_CONF"]
    checkout = Path(__file__).resolve().parents[1] / "conf"
    return str(checkout if checkout.is_dir() else Path(sys.prefix) / "share" / "adsfm" / "conf")


def compose(overrides: list[str] | None = None) -> Any:
    """The composed config, as `adsfm-train <overrides>` would see it (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [], return_hydra_config=False)
