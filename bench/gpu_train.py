"""Training on one CUDA device: the 100M-parameter scale point's DLRM (fused TBE on the GPU, an nccl world of
one) and the HSTU training step with the Triton attention kernel, through the project's own training step.

    python bench/gpu_train.py [--out FILE.json] [--params 1e8] [--steps 50] [--device cuda]

Part of `scripts/gpu_check.sh`. Needs torchrec and a CUDA fbgemm-gpu beside torch and triton; where they
are missing it says which import failed and exits 3, so the check reports it instead of a traceback.
`--device cpu --params 1e6 --steps 3` runs the same code on gloo and the PyTorch attention (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, result, write  # noqa: E402


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def dlrm(a: argparse.Namespace, device: Any) -> dict[str, float]:
    """The scale point's DLRM (Criteo-shaped tables, dim 32) on one device: samples/s of the training step."""
    import torch

    from adsfm.contract.config import ParallelConfig
    from adsfm.parallel.shard import OptimConfig, parallelize_model
    from adsfm.training.loop import train_step
    from adsfm.training.models.pooled import PooledRanker
    from bench import train as bt
    from bench.scale import DIM, cardinalities

    _, cards = cardinalities(a.params)
    ns = argparse.Namespace(tables=len(cards), rows=cards, dim=DIM, batch=a.batch, steps=a.steps, warmup=5)
    batches = [b.to(device) for b in bt._batches(ns, 1, 0)]
    torch.manual_seed(0)
    model = PooledRanker(bt._spec(ns), bt._model_cfg(ns), device="meta")
    dmp, opt, plan = parallelize_model(model, ParallelConfig(name="single", num_workers=1), OptimConfig("rowwise_adagrad", 0.05, "adam", 1e-3), device)
    for b in batches[: ns.warmup]:
        train_step(dmp, opt, b)
    _sync(device)
    t0 = time.perf_counter()
    for b in batches[ns.warmup :]:
        train_step(dmp, opt, b)
    _sync(device)
    seconds = time.perf_counter() - t0
    kernels = sorted({str(r.get("compute_kernel")) for r in plan})
    print(f"DLRM {sum(cards) * DIM:,} embedding parameters on {device}: {a.steps * a.batch / seconds:,.0f} samples/s "
          f"(batch {a.batch}, {a.steps} steps; kernels {kernels})", flush=True)
    return {"dlrm_params": float(sum(cards) * DIM), "dlrm_samples_per_s": a.steps * a.batch / seconds}


def hstu(a: argparse.Namespace, device: Any) -> dict[str, float]:
    """The HSTU step (experiment=synthetic_hstu, histories up to 1,024) with the attention kernel the device
    gets: Triton on CUDA. Steps/s and the loss going down."""
    import torch

    from adsfm.contract.config import as_config, compose
    from adsfm.parallel.kernels.hstu_attention import _choose_kernel
    from adsfm.parallel.shard import parallelize_model
    from adsfm.training.data import iter_batches, load_features
    from adsfm.training.loop import train_step
    from adsfm.training.models import build_model
    from adsfm.training.worker import optim_config

    cfg = as_config(compose(["experiment=synthetic_hstu", "run_root=/tmp/adsfm-gpu-train"]))
    fs = load_features(cfg.data)
    torch.manual_seed(0)
    model = build_model(fs.spec, cfg.model, device="meta")
    dmp, opt, _ = parallelize_model(model, cfg.parallel, optim_config(cfg), device)  # type: ignore[arg-type]
    kernel = _choose_kernel(torch.zeros(1, device=device), str(cfg.model.sequence.attention_kernel))  # what the layers pick
    losses, n = [], 0
    _sync(device)
    t0 = time.perf_counter()
    for rows in iter_batches(fs.train_idx, cfg.train.batch_size, 0, 1, seed=0):
        losses.append(train_step(dmp, opt, fs.take(rows).to(device)))
        n += 1
        if n >= a.hstu_steps:
            break
    _sync(device)
    seconds = time.perf_counter() - t0
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"HSTU on {device}, attention kernel {kernel}: {n / seconds:.1f} steps/s (batch {cfg.train.batch_size}), "
          f"loss {first:.4f} -> {last:.4f} over {n} steps", flush=True)
    return {"hstu_steps_per_s": n / seconds, "hstu_loss_first5": first, "hstu_loss_last5": last}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--params", type=float, default=1e8)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--hstu-steps", type=int, default=60)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    try:
        import fbgemm_gpu  # noqa: F401
        import torch
        import torch.distributed as dist
        import torchrec  # noqa: F401

        import adsfm.parallel.shard  # noqa: F401  the project itself (pip install --no-deps -e .)
    except ImportError as e:
        print(f"SKIP gpu_train: {e} (needs torchrec, a CUDA fbgemm-gpu matching torch, and adsfm installed)")
        return 3
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("SKIP gpu_train: no CUDA device")
        return 3
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    values = {**dlrm(a, device), **hstu(a, device)}
    config = {"params": a.params, "batch": a.batch, "steps": a.steps, "hstu_steps": a.hstu_steps, "device": str(device)}
    write(result("gpu_train", config, values, {}), a.out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
