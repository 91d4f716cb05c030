#!/usr/bin/env bash
# Creates .venv with the exact CPU stack from requirements/lock.txt, then installs adsfm in editable mode.
# The lock is complete (every transitive package pinned), so it installs with --no-deps: that is what keeps
# torchrec's metadata from pulling the CUDA fbgemm-gpu, which shadows fbgemm-gpu-cpu and fails to load.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
# Debian packages, installed when we are root: haproxy, Ray Serve's fastest ingress (adsfm.contract.cluster;
# without it serving falls back to the direct ingress, slower but correct), and wrk, the compiled load
# generator of bench/serve.py.
missing=""
command -v haproxy >/dev/null || missing="$missing haproxy"
command -v wrk >/dev/null || missing="$missing wrk"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Debian packages:$missing"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
    || echo "[setup] could not install$missing; without haproxy serving uses cluster.serve_ingress=direct" >&2
fi
stamp="$VENV/.adsfm-lock.sha"
want=$(sha256sum requirements/lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $VENV with the pinned CPU stack (first time: a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip's warnings about this machine's optional local indexes are noise; real errors still fail the script.
pipq() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pipq install -q --upgrade "pip>=24"
pipq install -q --no-deps -r requirements/lock.txt
# adsfm itself, editable: contract/, training/, ... import as adsfm.<name> (pyproject's package-dir mapping).
# setuptools prints a banner about editable installs on every build; keep it in a log unless the build fails.
"$VENV/bin/python" -m pip install -q --no-deps -e . > "$VENV/adsfm-install.log" 2>&1 || { cat "$VENV/adsfm-install.log" >&2; exit 1; }
"$VENV/bin/python" - <<'PY'
import fbgemm_gpu, torch, torchrec  # noqa: F401  fails loudly if the CUDA fbgemm-gpu slipped in
print(f"[setup] torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec, '__version__') else 'ok'}")
PY
echo "$want" > "$stamp"
