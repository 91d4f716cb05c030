"""The registry policy: what the champion and challenger aliases mean, how the traffic split between them
and the champion history are kept on the registered model, and how a version is fetched.

One module that export (registering), serving (following aliases and the split) and launch (promote,
rollback, shift) share. MLflow is the store; nothing here imports torch or another adsfm layer.
"""

from __future__ import annotations

import getpass
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adsfm.contract.manifest import Manifest

if TYPE_CHECKING:  # mlflow costs seconds to import: the functions that talk to the registry import it
    from mlflow.tracking import MlflowClient

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "adsfm.champion_history"
"""Prefix of the champion history's registered-model tags: one tag per move, `<prefix>.<ns>.<random>`,
written once and never rewritten, so concurrent moves cannot lose each other's entries and there is no
cap. (A tag named exactly the prefix is the JSON list older versions kept; it is read first.)"""
TRAFFIC_TAG = "adsfm.traffic"
"""Registered-model tag holding the champion/challenger split as JSON (Split)."""

@dataclass(frozen=True)
class Split:
    """How traffic is shared between the champion and the challenger alias."""

    challenger_pct: float = 0.0
    """Share of users (sticky) or requests answered by the challenger, 0-100."""
    shadow: bool = False
    """The challenger scores a copy of every request; its answer is logged and compared, never returned."""
    lease_until: float | None = None
    """Unix time until which the controller that wrote the split (adsfm-shift) vouches for it; it renews it
    while it watches. Past it (the controller was killed, its machine is gone) replicas serve the champion
    alone. None: no controller (a split set by hand, shadow mode)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.challenger_pct <= 100.0:
            raise ValueError(f"challenger_pct={self.challenger_pct}: must be within 0..100")

    def lapsed(self, now: float | None = None) -> bool:
        return self.lease_until is not None and (time.time() if now is None else now) > self.lease_until

    @classmethod
    def from_tag(cls, raw: str | None) -> Split:
        return cls(**json.loads(raw)) if raw else cls()

    def to_tag(self) -> str:
        return json.dumps(asdict(self))


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    # search_model_versions returns empty aliases; get_registered_model(...).aliases is right.
    try:
        v = client.get_registered_model(name).aliases.get(alias)
    except MlflowException:
        return None
    return None if v is None else str(v)


def champion_history(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Champion moves, oldest first: version, previous, at, by, reason, kind (promote/force/rollback)."""
    tags = client.get_registered_model(name).tags
    legacy: list[dict[str, Any]] = json.loads(tags[HISTORY_TAG]) if tags.get(HISTORY_TAG) else []
    keys = sorted(k for k in tags if k.startswith(HISTORY_TAG + "."))  # zero-padded ns first: time order
    return legacy + [json.loads(tags[k]) for k in keys]


def _set_alias(client: MlflowClient, name: str, alias: str, version: str, tries: int = 5) -> None:
    """MLflow's SQL store reads, then inserts or updates an alias: two moves at once can collide on the
    insert (IntegrityError). The later one is retried, as it would be by hand."""
    from mlflow.exceptions import MlflowException

    for attempt in range(tries):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException:
            if attempt == tries - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _who() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:
        return "unknown"


def _move_champion(client: MlflowClient, name: str, target: str, kind: str, reason: str, extra: dict[str, str]) -> None:
    previous = alias_version(client, name, CHAMPION)
    moved = previous != target  # re-promoting the champion is not a move: tag it, keep the history clean
    if moved:
        _set_alias(client, name, CHAMPION, target)
    now = time.time_ns()  # after the move: the history's order is the order the alias took its values
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e9))
    entry = {"version": target, "previous": previous, "at": at, "by": _who(), "reason": reason or kind, "kind": kind}
    if moved:  # a tag of its own, written once: concurrent moves cannot overwrite each other's entries
        client.set_registered_model_tag(name, f"{HISTORY_TAG}.{now:020d}.{uuid.uuid4().hex[:8]}", json.dumps(entry))
    tags = {"adsfm.promoted_by": entry["by"], "adsfm.promoted_at": at, "adsfm.promote_reason": entry["reason"],
            "adsfm.promote_kind": kind, "adsfm.previous_champion": previous or "", **extra}
    for k, v in tags.items():
        client.set_model_version_tag(name, target, k, v)


def promote(
    name: str, tracking_uri: str, version: str | None = None, reason: str = "", forced: bool = False, gate: str = ""
) -> str:
    """Move champion to `version` (default: the challenger); record who, when, why (and the gate's verdict
    or that it was forced) on the version and in the model's champion history."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    target = version or alias_version(client, name, CHALLENGER)
    if target is None:
        raise ValueError(f"model {name!r} has no {CHALLENGER} alias; pass --version")
    client.get_model_version(name, str(target))  # raises with MLflow's message if it does not exist
    _move_champion(client, name, str(target), "force" if forced else "promote", reason, {"adsfm.gate": gate})
    return str(target)


def rollback(name: str, tracking_uri: str, reason: str = "") -> tuple[str, str]:
    """Champion back to the version it replaced, in one step: (from, to)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    current = alias_version(client, name, CHAMPION)
    moves = [h for h in champion_history(client, name) if h["kind"] != "rollback" and h["version"] == current]
    if current is None or not moves or not moves[-1]["previous"]:
        raise ValueError(f"model {name!r}: champion {current} has no previous champion to roll back to")
    target = str(moves[-1]["previous"])
    _move_champion(client, name, target, "rollback", reason, {})
    return current, target


def download_version(name: str, version: str, tracking_uri: str, dst: Path) -> Path:
    """Local bundle directory of models:/name/version, downloaded under `dst` once."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    target = dst / f"{name}-v{version}"
    if not (target / "MLmodel").exists():
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(target))
    bundle = target / _bundle_path(target / "MLmodel")
    Manifest.read(bundle)
    return bundle


def _bundle_path(mlmodel: Path) -> str:
    """Where MLflow put the 'bundle' artifact (it keeps the source directory's name, not the key)."""
    import yaml

    spec = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if "bundle" not in artifacts:
        raise ValueError(f"{mlmodel}: not an adsfm model (no 'bundle' artifact)")
    return str(artifacts["bundle"]["path"])


def resolve(name: str, alias: str, tracking_uri: str, dst: Path) -> tuple[str, Path]:
    """(version, local bundle directory) of models:/name@alias."""
    from mlflow.tracking import MlflowClient

    ver = alias_version(MlflowClient(tracking_uri), name, alias)
    if ver is None:
        raise LookupError(f"model {name!r} has no alias {alias!r} in {tracking_uri}; run adsfm-export / adsfm-promote")
    return ver, download_version(name, ver, tracking_uri, dst)


def describe(name: str, tracking_uri: str) -> str:
    """Versions with aliases and lineage, then the champion history: what `adsfm-models NAME` prints."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    model = client.get_registered_model(name)
    by_version: dict[str, list[str]] = {}
    for alias, v in model.aliases.items():
        by_version.setdefault(str(v), []).append(alias)
    lines = [f"model {name}", f"{'ver':>4} {'aliases':<22} {'AUC':>8} {'precision':<10} {'bytes':>10} {'git':<9} {'parent':>6}  created"]
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version)):
        t = mv.tags
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(mv.creation_timestamp / 1000))
        lines.append(
            f"{mv.version:>4} {','.join(sorted(by_version.get(str(mv.version), []))) or '-':<22} "
            f"{t.get('adsfm.holdout_auc', '-'):>8} {t.get('adsfm.precision', '-'):<10} {t.get('adsfm.table_bytes', '-'):>10} "
            f"{t.get('adsfm.git_commit', '-')[:8]:<9} {t.get('adsfm.parent_version', '') or '-':>6}  {created}"
        )
        if t.get("adsfm.delta_log"):
            lines.extend("       " + line for line in delta_lines(t["adsfm.delta_log"]))
    lines.append("champion history (oldest first):")
    for h in champion_history(client, name):
        lines.append(f"  {h['at']}  {h['previous'] or '-':>4} -> {h['version']:<4} {h['kind']:<8} by {h['by']}: {h['reason']}")
    return "\n".join(lines)


def delta_lines(path: str) -> list[str]:
    """A version's delta log, newest last: what `adsfm-models` prints under the version."""
    from adsfm.contract.delta import DeltaLog

    log = DeltaLog(path)
    deltas = log.published()
    lines = [f"deltas: {len(deltas)} in {path} (generation {log.generation()})"]
    for d in deltas:
        auc = f"{d.window['auc']:.4f}" if "auc" in d.window else "-"
        lines.append(f"  delta {d.seq:>5}  events to {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(d.watermark))}  "
                     f"{sum(d.rows.values()):>8} rows {d.bytes:>10} bytes  window auc {auc}{'  +dense' if d.dense else ''}  "
                     f"published {time.strftime('%H:%M:%S', time.gmtime(d.published_at))}")
    return lines


def rollback_deltas(name: str, tracking_uri: str, to_seq: int, version: str | None = None) -> tuple[str, list[int]]:
    """Withdraw the deltas after `to_seq` from the delta log of `version` (default: the champion); replicas
    go back to the base plus the deltas left. Returns (version, withdrawn sequence numbers)."""
    from mlflow.tracking import MlflowClient

    from adsfm.contract.delta import DeltaLog

    client = MlflowClient(tracking_uri)
    version = version or alias_version(client, name, CHAMPION)
    if version is None:
        raise LookupError(f"model {name!r} has no champion in {tracking_uri}")
    path = client.get_model_version(name, version).tags.get("adsfm.delta_log")
    if not path:
        raise LookupError(f"model {name!r} version {version} has no delta log (adsfm.delta_log tag): nothing to roll back")
    return version, DeltaLog(path).rollback(to_seq)


@dataclass(frozen=True)
class Traffic:
    """What the registry says a replica should serve."""

    champion: str | None
    challenger: str | None
    split: Split
    """The split in force: the one written, or no split where its lease has lapsed."""
    lapsed: Split | None = None
    """The split written, when its controller's lease lapsed (so `split` is the champion alone)."""


def read_traffic(client: Any, name: str, alias: str = "champion") -> Traffic:
    """One registry read (MlflowClient `client`): the version `alias` points at and, when that is the
    champion, the challenger and the split (replicas serving another alias follow it alone)."""
    model = client.get_registered_model(name)
    main, challenger = model.aliases.get(alias), model.aliases.get(CHALLENGER)
    if alias != CHAMPION:
        return Traffic(None if main is None else str(main), None, Split())
    split = Split.from_tag(model.tags.get(TRAFFIC_TAG))
    champion, challenger = None if main is None else str(main), None if challenger is None else str(challenger)
    if split.lapsed():
        return Traffic(champion, challenger, Split(), lapsed=split)
    return Traffic(champion, challenger, split)


def write_split(client: Any, name: str, split: Split) -> None:
    client.set_registered_model_tag(name, TRAFFIC_TAG, split.to_tag())
