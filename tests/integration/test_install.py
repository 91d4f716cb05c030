"""`pip install .` puts adsfm.<layer> packages into site-packages and nothing named training, serving, ...:
the wheel built from this checkout holds the adsfm namespace, conf/ as data, and console scripts into it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("contract", "training", "parallel", "export", "serving", "launch")


def test_the_wheel_installs_the_adsfm_namespace_only(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(tmp_path.glob("adsfm-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"adsfm", wheel.name.split("-py3")[0] + ".dist-info", wheel.name.split("-py3")[0] + ".data"}, tops
    assert {f"adsfm/{p}/__init__.py" for p in PACKAGES} <= set(names)
    assert not any(n.startswith(("tests/", "bench/", "conf/")) for n in names)
    assert any(n.endswith("data/share/adsfm/conf/config.yaml") for n in names)
    assert "adsfm-train = adsfm.launch.train:main" in entry_points

    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".data"))} <= {"adsfm", "bin", "share"}
    code = ("import adsfm.contract.features as f, importlib.util as u; print(f.__file__); "
            "print([m for m in ('training', 'serving', 'export', 'parallel', 'launch', 'contract') if u.find_spec(m)])")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stderr[-2000:]
    where, tops_found = run.stdout.splitlines()
    assert where.startswith(str(site / "adsfm" / "contract")) and tops_found == "[]"
