"""Unit tests run on synthetic data, with no network and no trained fixture: every socket connection but a
Unix one is refused, and the MovieLens fixtures of tests/conftest.py are off limits here. A bundle of an
untrained DLRM over the messy synthetic table (tests/messy.py) stands in where a test needs one."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.messy import DATA, file_columns, messy_frame

FORBIDDEN = {"features", "trained", "small_cfg"}
"""tests/conftest.py's MovieLens fixtures: the data download and a trained model belong to tests/integration."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = FORBIDDEN & set(getattr(item, "fixturenames", ()))
        if "tests/unit/" in str(item.fspath) and used:
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(used)}: unit tests take synthetic data (tests/unit/conftest.py)")


class NetworkUnplugged(OSError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any connection over the network (loopback included) fails the test that makes it."""
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        raise NetworkUnplugged(f"unit tests run without network: connect({address!r})")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(NetworkUnplugged(f"create_connection{a}")))
    yield


@pytest.fixture(scope="session")
def messy_cfg(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The whole config for the messy table: DLRM, one process, small batches."""
    from adsfm.contract.config import DataConfig, compose, typed

    root = tmp_path_factory.mktemp("messy")
    path = root / "events.csv"
    file_columns(messy_frame()).to_csv(path, index=False)
    cfg = compose([f"run_root={root}", "parallel=single", "train.batch_size=64", "train.epochs=1", "train.progress=false",
                   "export.model_name=messy"])
    cfg.data = typed(DataConfig, {**DATA, "path": str(path), "cache_dir": str(root / "cache")})
    return cfg


@pytest.fixture(scope="session")
def messy() -> Any:
    return messy_frame()


@pytest.fixture(scope="session")
def messy_features(messy: Any, messy_cfg: Any) -> Any:
    """The messy table featurized as training does (add_history, then featurize)."""
    from adsfm.training.data import add_history, featurize

    frame = add_history(messy, messy_cfg.data)
    return frame, featurize(frame, messy_cfg.data)


@pytest.fixture(scope="session")
def messy_bundle(messy_features: Any, messy_cfg: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An untrained DLRM over the messy table, exported as a bundle (tables, dense.onnx, manifest)."""
    import torch

    from adsfm.contract.config import Precision
    from adsfm.export.bundle import write_dense_bundle
    from adsfm.training.models import build_model

    frame, fs = messy_features
    torch.manual_seed(0)
    model = build_model(fs.spec, messy_cfg.model, device="cpu").eval()
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    tables = [(c.name, model.sparse.embedding_bags[c.name].weight.detach()) for c in model.sparse.embedding_bag_configs()]
    manifest = write_dense_bundle(fs, out, tables, model.dense, {name: Precision.fp32 for name, _ in tables},
                                  messy_cfg.model.embedding_dim, messy_cfg.export.opset, {})
    return {"frame": frame, "features": fs, "model": model, "bundle": out, "manifest": manifest}
