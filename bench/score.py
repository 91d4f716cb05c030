"""Shared-user-compute scoring benchmark: the HSTU split graphs (user graph once, candidate graph over the
cached state) against the model's own joint forward, which already scores all N candidates at once.

    python bench/score.py [--quick] [--out FILE.json] [--history 200] [--candidates 1,10,100,500,1000]

One MovieLens user with a history of `--history` events (real items, ratings and times) and N candidates
drawn from the item catalogue. Paths, milliseconds per request (median of repeated calls, with the 10th and 90th percentiles), one thread each:
- joint (the baseline): the eager model, all N candidates in one forward (M-FALCON masking, no cache);
- split, cold: the user ONNX graph, then the candidate graph (a cache miss: what a new user costs);
- split, cached: the user state is in the cache; candidate tokens + the candidate ONNX graph;
- per-candidate (a third column, not a baseline): the eager model once per candidate.
The headline ratios are joint / split (cold and cached): > 1 where the split path is faster. The model's
weights are random (seeded): time does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import result, write  # noqa: E402


def timed_ms(fn: Callable[[], Any], budget_s: float, min_reps: int = 3, max_reps: int = 200) -> tuple[float, float, float]:
    """(median, 10th, 90th percentile) ms of `fn` over repeated calls within `budget_s`."""
    for _ in range(2):  # warm-up: allocations, ORT's first runs
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if len(times) < 3:
        return statistics.median(times), min(times), max(times)
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), deciles[0], deciles[-1]


def run(quick: bool, history: int, counts: list[int]) -> dict[str, Any]:

    import numpy as np
    import torch

    from adsfm.contract.config import as_config, compose
    from adsfm.export.sequence import export_sequence_bundle
    from adsfm.serving.sequence import SequenceEngine
    from adsfm.training.data import load_features
    from adsfm.training.models.hstu import HSTU

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = as_config(compose(["experiment=movielens_hstu", "parallel=single"]))
    fs = load_features(cfg.data)
    spec = fs.spec.model_copy(deep=True)
    spec.history.length = history  # the model is built for this history length
    model = HSTU(spec, cfg.model, device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():  # the relative biases start at zero; give every weight a value
            p.normal_(0, 0.1)
    out = Path(tempfile.mkdtemp(prefix="adsfm-bench-score-"))
    tables = [c.name for c in model.sparse.embedding_configs()]
    export_sequence_bundle(model, fs, out, dict.fromkeys(tables, "fp32"), cfg.export.opset, {})
    engine = SequenceEngine(out)

    # A real user with at least `history` ratings: their latest `history` events, as a service sends them.
    from adsfm.training.data import load_frame

    df, _ = load_frame(cfg.data)
    counts_by_user = df.groupby("user_id").size()
    uid = counts_by_user[counts_by_user >= history].index[0]
    ev = df[df.user_id == uid].sort_values("timestamp").tail(history)
    request_time = int(ev.timestamp.max()) + 3600
    user = {"user_id": str(uid), "history": ev.item_id.astype(str).tolist(), "history_rating": [f"{r:g}" for r in ev.rating],
            "history_time": ev.timestamp.astype(int).tolist(), "timestamp": request_time}
    for f in model.context_features:
        user[f] = str(ev[f].iloc[0])
    catalogue = list(engine.item_store)
    rng = np.random.default_rng(0)

    s = model.seq
    hist = torch.from_numpy(engine.rows_of(engine.features[s.history], user[s.history], ""))
    acts = torch.from_numpy(engine.rows_of(engine.features[s.actions], user[s.actions], ""))
    times = torch.tensor(user[s.times], dtype=torch.int64)
    ctx = {f: int(engine.rows_of(engine.features[f], user[f], "")[0]) for f in model.context_features}

    values: dict[str, float] = {}
    ratios: dict[str, float] = {}
    rows = []
    budget = 0.5 if quick else 2.0
    for n in counts:
        items = [{"item_id": i} for i in rng.choice(catalogue, size=n, replace=n > len(catalogue))]
        cand_rows = {f: torch.from_numpy(v) for f, v in engine.item_rows(items).items()}
        engine.score(user, items)  # fills the cache
        warm_t = timed_ms(lambda items=items: engine.score(user, items), budget)

        def cold(items: list[dict[str, Any]] = items) -> None:
            engine.user_cache.clear()
            engine.score(user, items)

        cold_t = timed_ms(cold, budget)
        with torch.no_grad():
            joint_t = timed_ms(lambda cr=cand_rows: model.score(hist, acts, times, ctx, cr, request_time), budget)

            def naive(cr: dict[str, torch.Tensor] = cand_rows, n: int = n) -> None:
                for j in range(n):
                    model.score(hist, acts, times, ctx, {f: v[j : j + 1] for f, v in cr.items()}, request_time)

            naive_ms = timed_ms(naive, budget, min_reps=1 if n >= 500 else 3)[0]
        warm, cold_ms, joint = warm_t[0], cold_t[0], joint_t[0]
        values.update({f"split_cached_ms_n{n}": warm, f"split_cold_ms_n{n}": cold_ms, f"joint_ms_n{n}": joint,
                       f"per_candidate_ms_n{n}": naive_ms})
        for name, t in (("split_cached", warm_t), ("split_cold", cold_t), ("joint", joint_t)):
            values[f"{name}_ms_p10_n{n}"], values[f"{name}_ms_p90_n{n}"] = t[1], t[2]
        ratios[f"split_cold_vs_joint_n{n}"] = joint / cold_ms
        ratios[f"split_cached_vs_joint_n{n}"] = joint / warm
        rows.append((n, warm, cold_ms, joint, naive_ms))
        print(f"  N={n}: joint {joint:.2f} [{joint_t[1]:.2f}, {joint_t[2]:.2f}] ms, split cold {cold_ms:.2f} "
              f"[{cold_t[1]:.2f}, {cold_t[2]:.2f}], cached {warm:.2f} [{warm_t[1]:.2f}, {warm_t[2]:.2f}], "
              f"per-candidate {naive_ms:.1f}", flush=True)

    print(f"\n1 user x N candidates, history {history}, ms per request (median; p10 and p90 above and in the JSON), 1 thread")
    print(f"{'N':>6} {'joint eager':>12} {'split cold':>11} {'split cached':>13} {'cold vs joint':>14} {'cached vs joint':>16} {'per-candidate':>14}")
    for n, warm, cold_ms, joint, naive_ms in rows:
        print(f"{n:>6} {joint:>12.2f} {cold_ms:>11.2f} {warm:>13.2f} {joint / cold_ms:>13.2f}x {joint / warm:>15.2f}x {naive_ms:>14.1f}")
    return result("score", {"history": history, "candidates": counts, "quick": quick, "model": "movielens_hstu",
                            "threads": 1}, values, ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter timing budget per point")
    ap.add_argument("--history", type=int, default=200)
    ap.add_argument("--candidates", default="1,10,100,500,1000")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    a = ap.parse_args()
    write(run(a.quick, a.history, [int(x) for x in a.candidates.split(",")]), a.out)


if __name__ == "__main__":
    main()
