"""The result file every benchmark writes (../shared/DESIGN.md, Benchmarks): one shape, one writer."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "gpu": gpu, "platform": platform.platform(), "python": platform.python_version()}


def result(bench: str, config: dict[str, Any], values: dict[str, float], ratios: dict[str, float]) -> dict[str, Any]:
    """Raw figures in `values` (unit in the key), `ratios` > 1 where adsfm is better."""
    return {"bench": bench, "machine": machine(), "config": config, "values": values, "ratios": ratios}


def write(res: dict[str, Any], out: Path | None) -> None:
    if out:
        out.write_text(json.dumps(res, indent=1))
        print(f"wrote {out}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
