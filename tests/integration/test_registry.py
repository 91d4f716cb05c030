"""MLflow registry round trip on a real sqlite store: register, aliases, promote, resolve, pyfunc."""

from __future__ import annotations

from importlib.metadata import version as version_of
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def test_register_promote_resolve_round_trip(trained: dict[str, Any], tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from adsfm.contract.manifest import Manifest
    from adsfm.contract.registry import promote, resolve
    from adsfm.contract.tracking import ensure_experiment
    from adsfm.export.register import log_and_register
    from adsfm.serving.engine import DenseGraphEngine

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "registry-test", str(tmp_path))
    client = MlflowClient(uri)

    def aliases() -> dict[str, str]:
        return {k: str(v) for k, v in client.get_registered_model("ranker-test").aliases.items()}

    v1 = str(log_and_register(trained["bundle"], "ranker-test", uri, run_id=None, experiment_id=exp).version)
    assert aliases() == {"champion": v1, "challenger": v1}  # the first version is champion

    v2 = str(log_and_register(trained["bundle"], "ranker-test", uri, run_id=None, experiment_id=exp).version)
    assert aliases() == {"champion": v1, "challenger": v2}

    assert promote("ranker-test", uri, reason="test") == v2
    assert aliases()["champion"] == v2
    tags = client.get_model_version("ranker-test", v2).tags
    assert tags["adsfm.previous_champion"] == v1 and tags["adsfm.promote_reason"] == "test"

    version, bundle = resolve("ranker-test", "champion", uri, tmp_path / "dl")
    assert version == v2
    assert Manifest.read(bundle) == Manifest.read(trained["bundle"])

    # The pyfunc model (models-from-code) scores like the ranker on its own input example.
    from adsfm.export.register import input_example

    model = mlflow.pyfunc.load_model("models:/ranker-test@champion")
    df = input_example(trained["bundle"])
    np.testing.assert_allclose(np.asarray(model.predict(df)), DenseGraphEngine(trained["bundle"]).score_records(df.to_dict("records")))
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/ranker-test@champion")).read_text().split()
    assert f"adsfm=={version_of('adsfm')}" in requirements  # the pyfunc needs this adsfm, pinned
    assert any(r.startswith("onnxruntime==") for r in requirements)

    with pytest.raises(LookupError, match="no alias 'staging'"):
        resolve("ranker-test", "staging", uri, tmp_path / "dl")


def test_parity_failure_is_not_registered(trained: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    from adsfm.contract.manifest import Manifest
    from adsfm.export.register import log_and_register

    bundle = tmp_path / "bundle"
    shutil.copytree(trained["bundle"], bundle)
    m = Manifest.read(bundle)
    assert m.parity is not None
    m.parity.passed = False
    m.write(bundle)
    with pytest.raises(ValueError, match="refusing to register"):
        log_and_register(bundle, "never", f"sqlite:///{tmp_path / 'db.sqlite'}", run_id=None)
