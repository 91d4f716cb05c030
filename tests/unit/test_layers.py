"""The layers of ../shared/DESIGN.md hold: the import contracts (.importlinter, run by `make lint`) keep on
this tree, and a planted import that points up a layer breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("contract", "training", "parallel", "export", "serving", "launch")
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over `tree`/adsfm (found before the editable install: it comes first on the path)."""
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT), "--config", str(ROOT / ".importlinter"), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tree")
    for p in PACKAGES:
        shutil.copytree(ROOT / p, out / "adsfm" / p, ignore=shutil.ignore_patterns("__pycache__"))
    return out


@pytest.mark.parametrize("where,line,broken", [
    (None, None, None),
    ("serving/planted.py", "from adsfm.training import data", "Serving loads artifacts"),
    ("training/planted.py", "from adsfm.export import bundle", "Layers"),
    ("contract/planted.py", "import torch", "The contract imports no torch"),
    ("parallel/planted.py", "from adsfm.training.models import dlrm", "Parallel knows no model"),
])
def test_import_contracts(tree: Path, where: str | None, line: str | None, broken: str | None) -> None:
    planted = tree / "adsfm" / where if where else None
    if planted is not None:
        planted.write_text(f"{line}  # planted by tests/unit/test_layers.py\n")
    try:
        proc = _lint(tree)
    finally:
        if planted is not None:
            planted.unlink()
    out = proc.stdout + proc.stderr
    assert "Analyzed" in out, out[-3000:]
    if broken is None:
        assert proc.returncode == 0, out[-3000:]
        assert "BROKEN" not in out
    else:
        assert proc.returncode != 0, out[-3000:]
        assert any(broken in ln and "BROKEN" in ln for ln in out.splitlines()), out[-3000:]
        assert where.removesuffix(".py").replace("/", ".") in out  # the offending module is named
