"""launch/cluster.yaml and launch/rayjob.yaml hold up against Ray's schema, the config schema and the lock.

The manifests name Hydra overrides and a parallel layout that nothing else runs here (there is no AWS or
Kubernetes on this machine): the checks below compose those overrides exactly as adsfm-train would, so a
renamed or misspelt key fails this test, and check that the nodes they ask for can hold the layout.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "launch" / "cluster.yaml"
RAYJOB_YAML = ROOT / "launch" / "rayjob.yaml"
TRAIN_COMMANDS = (["python", "-m", "adsfm.launch.train"], ["adsfm-train"])


class ManifestError(ValueError):
    pass


def ray_pin() -> str:
    """The Ray version requirements/lock.txt installs: the one every manifest must name."""
    m = re.search(r"^ray==(\S+)$", (ROOT / "requirements" / "lock.txt").read_text(), re.M)
    assert m, "requirements/lock.txt pins no ray==VERSION"
    return m.group(1)


def compose_layout(overrides: list[str], where: str) -> Any:
    """The config adsfm-train would run with `overrides`, checked as far as it can be without the data."""
    from adsfm.contract.cluster import InvalidOverrides, validate_overrides
    from adsfm.parallel.config import validate_parallel

    try:
        cfg = validate_overrides(overrides)  # what adsfm-submit checks before it submits
    except InvalidOverrides as e:
        raise ManifestError(f"{where}: overrides do not compose: {e}") from e
    try:
        # Table names come from the data, which is not here; the config's own per-table keys stand in.
        validate_parallel(cfg.parallel, list(cfg.parallel.tables))
    except ValueError as e:
        raise ManifestError(f"{where}: {e}") from e
    p, t = cfg.parallel, cfg.train
    if t.batch_size % p.num_workers:
        raise ManifestError(f"{where}: train.batch_size({t.batch_size}) % parallel.num_workers({p.num_workers}) != 0")
    return cfg


def cpu_quantity(q: object, where: str) -> float:
    """A Kubernetes CPU quantity ("4", "500m", 2) or a Ray resource count, in CPUs."""
    s = str(q).strip()
    try:
        return float(s[:-1]) / 1000 if s.endswith("m") else float(s)
    except ValueError:
        raise ManifestError(f"{where}: {q!r} is not a CPU quantity") from None


def need(doc: Any, path: str) -> Any:
    """doc[a][b]... for path 'a.b...', or a ManifestError naming the first missing key."""
    node = doc
    for i, key in enumerate(path.split(".")):
        if not isinstance(node, dict) or key not in node:
            raise ManifestError(f"missing {'.'.join(path.split('.')[: i + 1])}")
        node = node[key]
    return node


def check_ray_versions(text: str, where: str) -> None:
    """Every Ray version the file names (pins, images, rayVersion) is the locked one."""
    pin = ray_pin()
    named = re.findall(r"ray==([\w.]+)", text) + re.findall(r"rayproject/ray:([\d.]+\d)", text)
    named += re.findall(r"rayVersion:\s*[\"']?([\w.]+)", text) + re.findall(r"-ray([\d.]+\d)-", text)
    for version in named:
        if version != pin:
            raise ManifestError(f"{where}: names Ray {version}, but requirements/lock.txt pins ray=={pin}")


def train_overrides(command: list[str], where: str) -> list[str]:
    for prefix in TRAIN_COMMANDS:
        if command[: len(prefix)] == prefix:
            return command[len(prefix):]
    raise ManifestError(f"{where}: {shlex.join(command)!r} does not start with one of {[shlex.join(p) for p in TRAIN_COMMANDS]}")


def check_rayjob(doc: dict[str, Any], text: str) -> Any:
    """The RayJob's structure, its entrypoint against the config schema, its workers against the layout."""
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        raise ManifestError(f"apiVersion/kind: {doc.get('apiVersion')}/{doc.get('kind')}, expected ray.io/v1/RayJob")
    need(doc, "metadata.name")
    cfg = compose_layout(train_overrides(shlex.split(need(doc, "spec.entrypoint")), "spec.entrypoint"), "spec.entrypoint")
    cluster = need(doc, "spec.rayClusterSpec")
    if str(cluster.get("rayVersion")) != ray_pin():
        raise ManifestError(f"spec.rayClusterSpec.rayVersion={cluster.get('rayVersion')!r}: expected {ray_pin()!r}")
    groups = {"headGroupSpec": [need(cluster, "headGroupSpec")]}
    groups["workerGroupSpecs"] = need(cluster, "workerGroupSpecs")
    if not groups["workerGroupSpecs"]:
        raise ManifestError("spec.rayClusterSpec.workerGroupSpecs is empty")
    worker_cpus = 0.0
    for name, specs in groups.items():
        for i, spec in enumerate(specs):
            where = f"spec.rayClusterSpec.{name}" + (f"[{i}]" if name == "workerGroupSpecs" else "")
            containers = need(spec, "template.spec.containers")
            if not containers or not all(c.get("image") for c in containers):
                raise ManifestError(f"{where}.template.spec.containers: each needs an image")
            ray_container = containers[0]
            limits = need(ray_container, "resources.limits")
            if name == "headGroupSpec":
                continue
            replicas = int(spec.get("replicas", 0))
            if not spec.get("minReplicas", 0) <= replicas <= spec.get("maxReplicas", replicas):
                raise ManifestError(f"{where}: replicas({replicas}) outside [minReplicas, maxReplicas]")
            # Ray counts the pod's CPUs from rayStartParams num-cpus, else from the container's CPU limit.
            cpu = (spec.get("rayStartParams") or {}).get("num-cpus", limits.get("cpu"))
            worker_cpus += replicas * cpu_quantity(cpu, f"{where} CPUs")
    check_capacity(cfg, worker_cpus, "spec.rayClusterSpec.workerGroupSpecs")
    check_ray_versions(text, "rayjob.yaml")
    return cfg


def check_capacity(cfg: Any, worker_cpus: float, where: str) -> None:
    p = cfg.parallel
    wanted = p.num_workers * p.cpu_per_worker
    if worker_cpus < wanted:
        raise ManifestError(
            f"{where}: the workers hold {worker_cpus:g} CPUs, but parallel.num_workers({p.num_workers}) x "
            f"parallel.cpu_per_worker({p.cpu_per_worker:g}) = {wanted:g}: add workers or CPUs, or shrink the layout"
        )


def ray_cluster_schema() -> dict[str, Any]:
    """Ray's own JSON schema for cluster launcher configs (read from the package, without importing ray)."""
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations
    return json.loads((Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json").read_text())


def check_cluster_yaml(doc: dict[str, Any], text: str) -> Any:
    """Ray's schema, the node types against the layout of the documented adsfm-submit command."""
    import jsonschema

    from adsfm.launch.submit import parser

    try:
        jsonschema.validate(doc, ray_cluster_schema())
    except jsonschema.ValidationError as e:
        raise ManifestError(f"cluster.yaml: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}") from None
    for key in ("cluster_name", "provider.type", "max_workers", "head_node_type", "available_node_types",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        need(doc, key)
    types = doc["available_node_types"]
    head = doc["head_node_type"]
    if head not in types:
        raise ManifestError(f"head_node_type={head!r} is not one of available_node_types {sorted(types)}")
    if not any("scripts/setup_venv.sh" in c for c in doc["setup_commands"]):
        raise ManifestError("setup_commands: none runs scripts/setup_venv.sh (the pinned, --no-deps install)")
    workers = {n: t for n, t in types.items() if n != head}
    if sum(t.get("min_workers", 0) for t in workers.values()) > doc["max_workers"]:
        raise ManifestError("available_node_types: min_workers add up to more than max_workers")
    # The cluster's standing capacity (min_workers) must hold the layout without waiting for the autoscaler.
    worker_cpus = sum(t.get("min_workers", 0) * t["resources"].get("CPU", 0) for t in workers.values())

    # A comment line that is the command itself (`#   .venv/bin/adsfm-submit ...`), not prose naming it.
    submits = [m.group(1) for m in re.finditer(r"^\s*#\s+((?:\S*/)?adsfm-submit\s.*)$", text, re.M)]
    if len(submits) != 1:
        raise ManifestError(f"cluster.yaml: expected one documented adsfm-submit command in its comments, found {len(submits)}")
    argv = shlex.split(submits[0])
    try:
        overrides = parser().parse_intermixed_args(argv[1:]).overrides
    except SystemExit:  # argparse has printed what it did not understand
        raise ManifestError(f"cluster.yaml: adsfm-submit does not accept {shlex.join(argv[1:])}") from None
    cfg = compose_layout(overrides, "cluster.yaml's adsfm-submit command")
    check_capacity(cfg, worker_cpus, "available_node_types (non-head min_workers x resources.CPU)")
    check_ray_versions(text, "cluster.yaml")
    return cfg


def _load(path: Path) -> tuple[dict[str, Any], str]:
    text = path.read_text()
    return yaml.safe_load(text), text


def test_rayjob_manifest() -> None:
    cfg = check_rayjob(*_load(RAYJOB_YAML))
    assert cfg.parallel.num_workers > 1  # the point of the manifest: more than one machine's worth


def test_cluster_launcher_config() -> None:
    cfg = check_cluster_yaml(*_load(CLUSTER_YAML))
    assert cfg.parallel.num_workers > 1
    assert str(cfg.run_root).startswith("/")  # a relative run_root would land in the job's working_dir copy


def test_the_checks_catch_a_broken_rayjob() -> None:
    doc, text = _load(RAYJOB_YAML)
    bad = copy.deepcopy(doc)
    bad["spec"]["entrypoint"] += " train.nope=1"
    with pytest.raises(ManifestError, match=r"train\.nope"):
        check_rayjob(bad, text)
    small = copy.deepcopy(doc)
    small["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas=1, minReplicas=1)
    with pytest.raises(ManifestError, match=r"parallel\.num_workers"):
        check_rayjob(small, text)
    with pytest.raises(ManifestError, match="pins ray=="):
        check_rayjob(doc, text.replace("rayproject/ray:2.60.0", "rayproject/ray:2.59.0"))
    del doc["spec"]["rayClusterSpec"]["headGroupSpec"]
    with pytest.raises(ManifestError, match="headGroupSpec"):
        check_rayjob(doc, text)


def test_the_checks_catch_a_broken_cluster_config() -> None:
    doc, text = _load(CLUSTER_YAML)
    with pytest.raises(ManifestError, match=r"parallel\.cpu_per_worker"):
        check_cluster_yaml(doc, text.replace("parallel.cpu_per_worker=2 run_root", "parallel.cpu_per_worker=4 run_root"))
    with pytest.raises(ManifestError, match=r"parallel\.num_wokers"):
        check_cluster_yaml(doc, text.replace("parallel.num_workers=4", "parallel.num_wokers=4"))
    typo = copy.deepcopy(doc)
    typo["head_start_ray_comands"] = typo.pop("head_start_ray_commands")
    with pytest.raises(ManifestError, match="head_start_ray_comands"):
        check_cluster_yaml(typo, text)


SERVE_YAML = ROOT / "launch" / "serve.yaml"


def check_serve_config(doc: dict[str, Any]) -> Any:
    """Ray Serve's own config schema, then our app builder on the args (no Ray cluster needed)."""
    from ray.serve.schema import ServeDeploySchema

    from adsfm.serving.app import app_builder

    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    (app_cfg,) = schema.applications
    if app_cfg.import_path != "adsfm.serving.app:app_builder":
        raise ManifestError(f"serve.yaml: import_path {app_cfg.import_path!r} is not adsfm.serving.app:app_builder")
    if doc["http_options"]["host"] != "127.0.0.1":
        raise ManifestError("serve.yaml: http_options.host must stay 127.0.0.1 in the shipped file")
    try:
        return app_builder(dict(app_cfg.args))
    except (TypeError, ValueError) as e:
        raise ManifestError(f"serve.yaml: {e}") from None


def test_serve_run_config() -> None:
    doc, _ = _load(SERVE_YAML)
    check_serve_config(doc)
    broken = yaml.safe_load(SERVE_YAML.read_text())
    broken["applications"][0]["args"]["max_replica"] = 2
    with pytest.raises(ManifestError, match=r"unknown keys \['max_replica'\]"):
        check_serve_config(broken)


def test_serve_yaml_and_hydra_read_the_same_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """ADSFM_SERVE_TOKEN reaches the replica's config both ways: `serve run launch/serve.yaml` (the app
    builder) and the Hydra path (conf/serve); without it neither requires one."""
    from adsfm.contract.config import as_config, compose

    doc, _ = _load(SERVE_YAML)
    for token in ("s3cret", None):
        if token is None:
            monkeypatch.delenv("ADSFM_SERVE_TOKEN", raising=False)
        else:
            monkeypatch.setenv("ADSFM_SERVE_TOKEN", token)
        built = check_serve_config(doc)._bound_deployment.init_args[0]
        assert built.auth_token == token
        assert as_config(compose([])).serve.auth_token == token
