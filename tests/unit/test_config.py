"""Every file in conf/ composes onto the schema; bad configs fail before anything starts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from adsfm.contract.config import compose, conf_dir

CONF = Path(conf_dir())


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", _names("experiment"))
def test_every_experiment_composes(experiment: str) -> None:
    from adsfm.contract.config import as_config

    cfg = as_config(compose([f"experiment={experiment}"]))
    assert cfg.experiment_name == experiment
    assert cfg.parallel.num_workers >= 1


@pytest.mark.parametrize(
    "group,name", [(g, n) for g in ("model", "data", "parallel", "train", "export", "serve", "cluster") for n in _names(g)]
)
def test_every_group_file_composes(group: str, name: str) -> None:
    from adsfm.contract.config import as_config

    cfg = as_config(compose([f"{group}={name}"]))
    assert cfg[group] is not None


def test_misspelt_key_fails_at_composition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)):
        compose(["train.learning_rat=0.1"])
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    with open(conf / "train" / "default.yaml", "a") as f:
        f.write("learning_rat: 0.1\n")  # a typo in YAML, not on the command line
    monkeypatch.setenv("ADSFM_CONF", str(conf))
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError), match="learning_rat"):
        compose([])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["train.epochs=three"])


def test_bad_layout_is_refused_with_the_arithmetic(messy_cfg: Any) -> None:
    from omegaconf import OmegaConf, open_dict

    from adsfm.contract.config import TableConstraint
    from adsfm.training.job import validate

    cfg = OmegaConf.merge(messy_cfg, {"parallel": {"num_workers": 3}, "train": {"batch_size": 256}})
    with pytest.raises(ValueError, match=r"train.batch_size\(256\) % parallel.num_workers\(3\) = 1 != 0"):
        validate(cfg)  # type: ignore[arg-type]
    cfg = OmegaConf.merge(messy_cfg, {"parallel": {"sharding_types": ["column_wise"], "column_split": 8}})
    with pytest.raises(ValueError, match=r"column_split\(8\) < model.embedding_dim\(16\) and train.sparse_optimizer=rowwise_adagrad"):
        validate(cfg)  # type: ignore[arg-type]
    validate(OmegaConf.merge(cfg, {"train": {"sparse_optimizer": "adagrad"}}))  # type: ignore[arg-type]
    cfg = OmegaConf.merge(messy_cfg, {"parallel": {"memory_per_rank_gb": 0.00001}})  # 10 KiB: the item table alone is 100
    with pytest.raises(ValueError, match=r"the planner places the tables on no layout of 1 rank.*memory_per_rank_gb=1e-05"):
        validate(cfg)  # type: ignore[arg-type]
    validate(OmegaConf.merge(cfg, {"parallel": {"memory_per_rank_gb": 1.0}}))  # type: ignore[arg-type]
    cfg = OmegaConf.merge(messy_cfg, {"parallel": {"dp": 2, "tp": 2, "num_workers": 3, "data_parallel": "fsdp"}})
    with pytest.raises(ValueError, match=r"parallel.dp\(2\) \* parallel.tp\(2\) = 4 != parallel.num_workers\(3\)"):
        validate(cfg)  # type: ignore[arg-type]
    cfg = OmegaConf.merge(messy_cfg, {"parallel": {"tp": 2, "num_workers": 4}})
    with pytest.raises(ValueError, match=r"parallel.tp\(2\) > 1 with parallel.data_parallel=ddp.*use parallel.data_parallel=fsdp"):
        validate(cfg)  # type: ignore[arg-type]
    cfg = OmegaConf.merge(messy_cfg, {"parallel": {"tp": 3, "num_workers": 3, "data_parallel": "fsdp"}, "train": {"batch_size": 255}})
    with pytest.raises(ValueError, match=r"parallel.tp\(3\) splits model.over_arch\[0\]\(128\)"):
        validate(cfg)  # type: ignore[arg-type]
    cfg = OmegaConf.merge(messy_cfg, {"parallel": {"sparse_group": 3, "num_workers": 4}})
    with pytest.raises(ValueError, match=r"parallel.sparse_group\(3\): must divide parallel.num_workers\(4\)"):
        validate(cfg)  # type: ignore[arg-type]
    cfg = OmegaConf.merge(messy_cfg, {"parallel": {"sharding_types": ["grid_shard"]}})
    with pytest.raises(ValueError, match="grid_shard.*cannot run on device=cpu"):
        validate(cfg)  # type: ignore[arg-type]
    cfg = OmegaConf.merge(messy_cfg, {})
    with open_dict(cfg):
        cfg.parallel.tables["itme"] = TableConstraint(sharding_types=["table_wise"])
    with pytest.raises(ValueError, match=r"parallel.tables names \['itme'\]"):
        validate(cfg)  # type: ignore[arg-type]
    cfg = OmegaConf.merge(messy_cfg, {"model": {"dense_arch": [64, 8]}})
    with pytest.raises(ValueError, match=r"dense_arch\[-1\]\(8\) != model.embedding_dim\(16\)"):
        validate(cfg)  # type: ignore[arg-type]


@pytest.mark.parametrize("override", [
    "model.arch=dlm", "train.sparse_optimizer=adam", "export.precision=int4", "+export.table_precision.item=int4",
    "parallel.sharding_types=[table_wize]", "parallel.device=tpu", "cluster.serve_ingress=nginx",
    "model.sequence.attention_kernel=cuda", "data.source=csv", "data.sparse.0.side=both",
])
def test_a_choice_outside_its_enum_fails_at_composition(override: str) -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose([override])
    assert override.split("=")[1].strip("[]") in str(e.value) + str(e.value.__cause__)


def test_typed_merges_onto_the_schema_and_enums_compare_as_strings() -> None:
    from adsfm.contract.config import Arch, ServeConfig, to_plain, typed

    cfg = compose(["model=hstu"])
    assert cfg.model.arch == Arch.hstu == "hstu" and f"{cfg.model.arch}" == "hstu"
    assert to_plain(cfg.model)["arch"] == "hstu"  # plain containers carry strings, not enum objects
    serve = typed(ServeConfig, {"port": 9000, "model_name": "m"})
    assert serve.port == 9000 and serve.host == "127.0.0.1"
    with pytest.raises(Exception, match="prot"):
        typed(ServeConfig, {"prot": 9000})
