"""adsfm-shift on a live Ray Serve app under load. Three challengers in turn: one made to fail (its
artifacts corrupted in the artifact store after registration) and one deliberately slow (a dense graph
hundreds of times heavier) are each rolled back by the shift itself, on their error rate and on their
p99, with every request still answered; a healthy one, a different bundle (the int8 export of the
champion's checkpoint), then goes 50 → 100 % and becomes champion. Then a controller that dies mid-shift:
SIGKILLed at 25 %, its split is dropped by the replicas once its lease lapses; SIGTERMed, it puts the
champion back at once. No request fails throughout."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.load import SteadyLoad

pytestmark = pytest.mark.integration


def _slow_bundle(features: Any, small_cfg: Any, out: Path) -> Path:
    """An untrained DLRM whose top MLP is 3 x 4096 wide (about 90x the champion's work per candidate), with
    a passing parity check of its own: registrable, and slow."""
    import torch
    from omegaconf import OmegaConf

    from adsfm.contract.config import Precision
    from adsfm.export.bundle import write_dense_bundle
    from adsfm.export.parity import check_parity, eager_probs
    from adsfm.serving.engine import DenseGraphEngine
    from adsfm.training.models import build_model

    cfg = OmegaConf.merge(small_cfg, {"model": {"over_arch": [4096, 4096, 4096, 1]}})
    torch.manual_seed(0)
    model = build_model(features.spec, cfg.model, device="cpu").eval()
    tables = [(c.name, model.sparse.embedding_bags[c.name].weight.detach()) for c in model.sparse.embedding_bag_configs()]
    manifest = write_dense_bundle(features, out, tables, model.dense, {n: Precision.fp32 for n, _ in tables},
                                  cfg.model.embedding_dim, cfg.export.opset, {})
    idx = features.holdout_idx[:512]
    manifest.parity, _ = check_parity(eager_probs(model, features, idx), DenseGraphEngine(out), features, idx, 1e-5)
    manifest.write(out)
    return out


def test_shift_rolls_back_failing_and_slow_challengers_then_promotes_a_healthy_one(
    ray_cluster: None, serve_port: int, trained: dict[str, Any], features: Any, small_cfg: Any, tmp_path: Path
) -> None:
    import ray
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from adsfm.contract.config import ServeConfig
    from adsfm.contract.registry import CHAMPION, alias_version, read_traffic
    from adsfm.contract.tracking import ensure_experiment
    from adsfm.export.bundle import export_bundle
    from adsfm.export.register import log_and_register
    from adsfm.launch import shift
    from adsfm.serving import app
    from adsfm.serving.monitor import monitor
    from adsfm.training.data import example_request, load_frame

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "shift", str(tmp_path))
    store = tmp_path / "mlartifacts"

    def register(bundle: Path) -> str:
        return str(log_and_register(bundle, "shift", uri, run_id=None, experiment_id=exp).version)

    register(trained["bundle"])  # v1: champion
    before = set(store.rglob("*.onnx"))
    v2 = register(trained["bundle"])
    corrupted = sorted(set(store.rglob("*.onnx")) - before)
    assert corrupted
    for f in corrupted:  # the store now serves a broken challenger: replicas fail to load it
        f.write_bytes(b"not an onnx graph")
    slow = _slow_bundle(features, small_cfg, tmp_path / "slow")
    int8 = export_bundle(OmegaConf.merge(small_cfg, {"export": {"precision": "int8"}}), trained["checkpoint"], tmp_path / "int8")
    assert {t.precision for t in int8.tables.values()} == {"int8"}

    url = app.start(ServeConfig(port=serve_port, model_name="shift", reload_interval_s=0.5), uri, name="shift")
    df, _ = load_frame(small_cfg.data)
    spread = features.holdout_idx[:: max(1, len(features.holdout_idx) // 40)][:40]  # many users: the split is by user
    requests_ = [example_request(df, features.spec, int(r), [str(i) for i in range(1, 31)]) for r in spread]
    assert len({str(r["user"]["user_id"]) for r in requests_}) >= 20
    args = ["shift", "--steps", "50,100", "--every", "2s", "--min-requests", "5", "--max-error-rate", "0.05",
            "--max-score-shift", "0.01", "--max-disagreement", "0.5", "--tracking-uri", uri]
    client = MlflowClient(uri)
    verdicts: dict[str, tuple[int, float]] = {}

    def run_shift(expected: int, label: str, p99_ms: float = 25) -> None:
        t0 = time.time()
        with pytest.raises(SystemExit) as done:
            shift.main([*args, "--max-p99-ms", f"{p99_ms:g}"])
        verdicts[label] = (int(done.value.code), time.time() - t0)
        assert done.value.code == expected, label

    try:
        with SteadyLoad(url, requests_, clients=2, retries=0) as load:
            time.sleep(2)
            run_shift(1, "failing")
            after_failure = dict(load.answers)
            assert read_traffic(client, "shift").split.challenger_pct == 0 and read_traffic(client, "shift").champion == "1"

            v3 = register(slow)
            run_shift(1, "slow")
            after_slow = dict(load.answers)
            assert read_traffic(client, "shift").split.challenger_pct == 0

            v4 = register(tmp_path / "int8")  # healthy, and a different bundle from the champion's
            # Judged at the default p99 limit: the healthy graph's own p99 was 6-18 ms on 2 cores under this
            # load, too close to the 25 ms that stops the slow one to hold on a busy CI machine.
            run_shift(0, "healthy", p99_ms=100)
            quality = ray.get(monitor("shift", create=False).window.remote(0.0))[v4]  # judged on these too
            time.sleep(2)  # the replica follows the new champion within reload_interval_s

            v5 = register(trained["bundle"])
            lapsed = _controller_killed(url, uri, v5, load, signal.SIGKILL, lease_s=2.0, reload_s=0.5)
            interrupted = _controller_killed(url, uri, v5, load, signal.SIGTERM, lease_s=60.0, reload_s=0.5)
    finally:
        app.stop("shift")
    seen = load.answers
    print(f"shift verdicts (exit status, seconds) {verdicts}; whole run {load.ok} answered, {load.failed} failed, "
          f"by (version, fallback) {seen}")
    assert load.failed == 0, load.errors[:5]
    assert after_failure.get(("1", "challenger_unavailable"), 0) > 0  # the failing share was answered by v1
    assert not any(v == v2 and fb is None for v, fb in seen)  # the broken version answered nothing
    assert after_slow.get((v3, None), 0) > 0  # the slow one answered: it was judged on its p99, not on errors
    assert seen.get((v4, None), 0) > 0
    assert alias_version(client, "shift", CHAMPION) == v4
    print(f"int8 challenger compared with the champion on {quality.compared} requests: score shift "
          f"{quality.score_shift:.2e}, top-10 disagreement {quality.disagreement:.1%}")
    assert quality.compared > 0 and quality.score_shift < 0.01
    print(f"controller SIGKILLed at 25 % (lease 2 s, reload 0.5 s): last challenger answer {lapsed:.2f} s later; "
          f"SIGTERM (lease 60 s): {interrupted:.2f} s later; failed requests {load.failed}")
    assert lapsed <= 2.0 + 2 * 0.5 + 0.5  # the lease, two reload intervals, a request in flight
    assert interrupted <= 2 * 0.5 + 0.5  # at once: no waiting for the lease
    assert read_traffic(client, "shift").split.challenger_pct == 0


def _controller_killed(url: str, uri: str, challenger: str, load: SteadyLoad, sig: int, lease_s: float, reload_s: float) -> float:
    """adsfm-shift in its own process at 25 % (steps that would hold a minute); once the challenger answers,
    the process gets `sig`. Returns how long the challenger went on answering afterwards. SIGKILL leaves the
    split in the registry, which the replicas drop when its lease lapses, and /metrics says why; SIGTERM
    puts the champion back itself (exit 143)."""
    import subprocess
    import sys

    import ray
    import requests

    from adsfm.contract.registry import Split, write_split

    cmd = [sys.executable, "-c", "from adsfm.launch.shift import main; main()", "shift", "--steps", "25,100",
           "--every", "60s", "--lease", f"{lease_s:g}s", "--min-requests", "1000", "--tracking-uri", uri,
           "--address", ray.get_runtime_context().gcs_address]
    before = load.versions().get(challenger, 0)  # answers from an earlier call do not count
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.time() + 90
        while load.versions().get(challenger, 0) == before:
            assert time.time() < deadline and proc.poll() is None, "the challenger never answered"
            time.sleep(0.2)
        proc.send_signal(sig)
        killed, code = time.time(), proc.wait(timeout=30)
    finally:
        proc.kill()
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), code
    last, seen = killed, load.versions().get(challenger, 0)
    quiet = (lease_s if sig == signal.SIGKILL else 0.0) + 4 * reload_s + 1  # how long the challenger must stay quiet
    while time.time() - last < quiet:
        time.sleep(0.1)
        now = load.versions().get(challenger, 0)
        if now != seen:
            last, seen = time.time(), now
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    lapsed = next(float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith("adsfm_split_lease_lapsed"))
    assert lapsed == (1.0 if sig == signal.SIGKILL else 0.0), metrics
    from mlflow.tracking import MlflowClient

    write_split(MlflowClient(uri), "shift", Split())  # what an operator does after a lapse: clear the split
    return last - killed
