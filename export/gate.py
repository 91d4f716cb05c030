"""The promotion gate: parity, quality against the champion measured now on the same holdout, latency.

Parity is judged again here, from the bundle's files: the raw values of the parity rows export recorded
go through the bundle's own featurization and graph, against the eager model's probabilities recorded
with them (the manifest's `passed` is not taken on trust). Bundles with quantized tables are also held to
a calibration band and a bound on their mean score shift from the fp32 eager model. Both models are scored
through their own featurization (raw values → their own vocabularies), so a champion trained on other
data or another vocabulary is compared fairly on the candidate's holdout.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from adsfm.contract.config import DataConfig, GateConfig, typed
from adsfm.contract.features import DenseFeatureSpec, SparseFeatureSpec
from adsfm.contract.manifest import Manifest
from adsfm.contract.registry import CHAMPION, alias_version, download_version
from adsfm.export.parity import judge, read_reference
from adsfm.serving.bundle import open_engine
from adsfm.serving.engine import DenseGraphEngine
from adsfm.serving.sequence import SequenceEngine
from adsfm.training.data import load_features, load_frame
from adsfm.training.metrics import ranking_metrics, task_columns


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class GateReport:
    name: str
    version: str
    champion: str | None
    checks: list[Check] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> str:
        return "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.passed)

    def summary(self) -> str:
        return "; ".join(f"{c.name} {'ok' if c.passed else 'FAIL'} ({c.detail})" for c in self.checks)

    def table(self) -> str:
        lines = [f"gate for {self.name} v{self.version} (champion: v{self.champion or '-'})"]
        lines += [f"  [{'ok' if c.passed else 'FAIL':>4}] {c.name:<8} {c.detail}" for c in self.checks]
        return "\n".join(lines)


def holdout_columns(manifest: Manifest, idx: np.ndarray | None = None) -> tuple[dict[str, list[Any]], np.ndarray]:
    """Rows `idx` (default: the holdout) of the data the candidate was trained on, as raw columns by
    feature name, and their labels."""
    if not manifest.data_config:
        raise ValueError("the bundle's manifest has no data_config; re-export it with this version of adsfm")
    cfg = typed(DataConfig, manifest.data_config)
    fs = load_features(cfg)
    df, _ = load_frame(cfg)
    idx = fs.holdout_idx if idx is None else idx
    rows = df.iloc[idx]
    features: list[SparseFeatureSpec | DenseFeatureSpec] = [*(f for f in fs.spec.sparse if not f.bucketizes), *fs.spec.dense]
    cols: dict[str, list[Any]] = {f.name: rows[f.source].tolist() for f in features}
    if manifest.item_column:
        cols[manifest.item_column] = rows[manifest.item_column].tolist()
    return cols, fs.labels[idx]


def verify_parity(engine: DenseGraphEngine | SequenceEngine, bundle: Path, gate: GateConfig) -> list[Check]:
    """Parity judged now from the bundle's files (see the module docstring); for quantized tables, also
    calibration and score shift."""
    m = engine.manifest
    if m.parity is None:
        return [Check("parity", False, "no parity check recorded; re-export the bundle")]
    try:
        idx, eager = read_reference(bundle, m.parity)
    except FileNotFoundError as e:
        return [Check("parity", False, str(e))]
    columns, labels = holdout_columns(m, idx)
    fields = m.request_fields()
    got = engine.score_columns({k: v for k, v in columns.items() if k in fields})
    p = judge(eager, got, labels, m.parity.tolerance, m.parity.auc_margin, m.parity.quantized)
    checks = [Check("parity", p.passed, f"recomputed: {p.reason()}")]
    if p.quantized:
        calibrations = [float(g.mean() / max(y.mean(), 1e-12)) for g, y in zip(task_columns(got), task_columns(labels), strict=True)]
        shift = float(np.abs(got - eager).mean())
        checks += [
            Check("calibration", all(gate.min_calibration <= c <= gate.max_calibration for c in calibrations),
                  f"{', '.join(f'{c:.4f}' for c in calibrations)} (mean predicted / observed over {len(labels)} rows"
                  f"{', per task' if len(calibrations) > 1 else ''}) vs band [{gate.min_calibration}, {gate.max_calibration}]"),
            Check("shift", shift <= gate.max_score_shift,
                  f"mean |quantized - fp32 eager| {shift:.2e} vs bound {gate.max_score_shift}"),
        ]
    return checks


def holdout_aucs(engine: DenseGraphEngine | SequenceEngine, columns: dict[str, list[Any]], labels: np.ndarray) -> dict[str, float]:
    """The holdout AUC of each of the engine's tasks ("" for a one-task model), against `labels` ([n] or
    [n, T]); a one-task model is held to the first task's labels."""
    fields = engine.manifest.request_fields()
    probs = engine.score_columns({k: v for k, v in columns.items() if k in fields})
    names = engine.manifest.features.tasks or [""]
    return {n: ranking_metrics(torch.from_numpy(p), torch.from_numpy(y))["auc"]
            for n, p, y in zip(names, task_columns(probs), task_columns(labels), strict=False)}


def scoring_latency(engine: DenseGraphEngine | SequenceEngine, columns: dict[str, list[Any]], candidates: int, requests: int) -> tuple[float, float]:
    """(p50, p99) ms of scoring 1 user x `candidates` items in-process (the replica's work per request),
    each request for another user of the holdout (distinct user-side values), so that no user-state cache
    answers it, as real traffic would find it."""
    m = engine.manifest
    fields = [k for k in m.request_fields("user") if k in columns]
    users: dict[str, dict[str, Any]] = {}
    for i in range(len(next(iter(columns.values()))) if columns else 0):
        user = {k: columns[k][i] for k in fields}
        users.setdefault(repr(sorted(user.items())), user)
        if len(users) > requests:
            break
    distinct = list(users.values())
    items = [{m.item_column: i} for i in list(engine.item_store)[:candidates]] if m.item_column else [{}] * candidates
    engine.score(distinct[-1], items)  # first-call costs, on a user that is not measured
    times = []
    for k in range(requests):
        user = distinct[k % max(len(distinct) - 1, 1)]
        t0 = time.perf_counter()
        engine.score(user, items)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]


def run_gate(name: str, version: str, tracking_uri: str, gate: GateConfig, workdir: Path) -> GateReport:
    client = MlflowClient(tracking_uri)
    champion = alias_version(client, name, CHAMPION)
    report = GateReport(name, version, champion)
    bundle = download_version(name, version, tracking_uri, workdir)
    manifest = Manifest.read(bundle)
    candidate = open_engine(bundle)
    report.checks += verify_parity(candidate, bundle, gate)
    columns, labels = holdout_columns(manifest)
    aucs = holdout_aucs(candidate, columns, labels)
    auc = next(iter(aucs.values()))
    report.metrics["candidate_auc"] = auc
    report.metrics.update({f"candidate_auc_{t}": a for t, a in aucs.items() if t})
    if champion is None or champion == version:
        report.checks.append(Check("quality", True, f"AUC {_aucs(aucs)}; no other champion to compare with"))
    else:
        champ = holdout_aucs(open_engine(download_version(name, champion, tracking_uri, workdir)), columns, labels)
        report.metrics["champion_auc"] = next(iter(champ.values()))
        # the same tasks are compared task by task; otherwise the first (headline) task's
        pairs = [(t, aucs[t], champ[t]) for t in aucs] if aucs.keys() == champ.keys() else [("", auc, report.metrics["champion_auc"])]
        ok = all(a >= c - gate.auc_margin for _, a, c in pairs)
        report.checks.append(Check("quality", ok, f"AUC {_aucs({t: a for t, a, _ in pairs})} vs champion v{champion} "
                                                  f"{_aucs({t: c for t, _, c in pairs})} (margin {gate.auc_margin}) on {len(labels)} holdout rows"))
    p50, p99 = scoring_latency(candidate, columns, gate.latency_candidates, gate.latency_requests)
    report.metrics.update(latency_p50_ms=p50, latency_p99_ms=p99)
    report.checks.append(
        Check("latency", p99 <= gate.latency_budget_ms, f"p99 {p99:.2f} ms (p50 {p50:.2f}) for 1 user x {gate.latency_candidates} vs budget {gate.latency_budget_ms} ms")
    )
    return report


def _aucs(aucs: dict[str, float]) -> str:
    return ", ".join(f"{t + ' ' if t else ''}{a:.4f}" for t, a in aucs.items())


class GateRefused(RuntimeError):
    def __init__(self, report: GateReport) -> None:
        super().__init__(f"promotion of {report.name} v{report.version} refused: {report.failures()}")
        self.report = report


def gated_promote(
    name: str, tracking_uri: str, version: str | None, gate: GateConfig, workdir: Path, force: bool = False, reason: str = ""
) -> GateReport:
    """Run the gate on `version` (default: the challenger); move champion if it passes or if forced
    (recorded as such). Raises GateRefused with the reasons otherwise."""
    from adsfm.contract.registry import CHALLENGER, promote

    client = MlflowClient(tracking_uri)
    target = version or alias_version(client, name, CHALLENGER)
    if target is None:
        raise ValueError(f"model {name!r} has no {CHALLENGER} alias; pass --version")
    client.get_model_version(name, target)
    report = run_gate(name, target, tracking_uri, gate, workdir)
    if not report.passed and not force:
        raise GateRefused(report)
    promote(name, tracking_uri, target, reason=reason, forced=force and not report.passed, gate=report.summary()[:4000])
    return report
