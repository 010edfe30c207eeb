"""Training configs: TOML in, typed dataclasses out, dotted overrides, the written copy reads back."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tapestry.train.config import (
    StageConfig,
    TrainConfigError,
    apply_override,
    config_from_data,
    dump_toml,
    load_config,
    parse_value,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def minimal() -> dict:
    return {"data": {"sources": [{"name": "a", "kind": "shards", "path": "x"}]}}


@pytest.mark.parametrize("name", ["test-tiny.toml", "toyworld-default.toml"])
def test_shipped_configs_load_and_round_trip(name):
    config = load_config(CONFIGS / name)
    again = config_from_data(tomllib.loads(dump_toml(config)))
    assert again == config
    assert config.total_steps == sum(s.steps for s in config.stages)


def test_overrides_reach_scalars_nested_tables_and_list_items():
    config = config_from_data(minimal(), ["optim.lr=1e-3", "optim.betas=[0.8, 0.99]", "model.vae=pool:2",
                                          "model.llm.num_layers=3", "data.sources.0.weight=2",
                                          "stages.0.steps=7", "stages.0.freeze=[\"vit\"]", "parallel.compile=true",
                                          "stages.0.lr_scale={vit = 0.1}"])
    assert config.optim.lr == 1e-3 and config.optim.betas == [0.8, 0.99]
    assert config.model.vae == "pool:2" and config.model.arch.llm.num_layers == 3
    assert config.data.sources[0].weight == 2.0
    assert config.stages[0] == StageConfig(steps=7, freeze=["vit"], lr_scale={"vit": 0.1})
    assert config.parallel.compile is True


def test_typos_and_wrong_types_are_errors_that_name_the_key():
    with pytest.raises(TrainConfigError, match=r"optim: unknown key\(s\) \['lrr'\]"):
        config_from_data(minimal(), ["optim.lrr=1"])
    with pytest.raises(TrainConfigError, match=r"optim.lr: expected a number"):
        config_from_data(minimal(), ["optim.lr=fast"])
    with pytest.raises(TrainConfigError, match=r"stages.0"):
        config_from_data(minimal(), ["stages.0.freeze=[\"brain\"]"])
    with pytest.raises(TrainConfigError, match="KEY=VALUE"):
        apply_override({}, "optim.lr")
    with pytest.raises(TrainConfigError, match="not an index"):
        config_from_data(minimal(), ["stages.3.steps=1"])
    with pytest.raises(TrainConfigError, match="keep \\+ drop_text \\+ drop_both = 1"):
        config_from_data(minimal(), ["dropout.policy=illume", "dropout.keep=0.5"])
    with pytest.raises(TrainConfigError, match="no such config file"):
        load_config("does/not/exist.toml")


def test_parse_value_reads_toml_and_falls_back_to_strings():
    assert parse_value("3e-4") == 3e-4 and parse_value("true") is True and parse_value("[1, 2]") == [1, 2]
    assert parse_value("pool:4") == "pool:4" and parse_value('"quoted"') == "quoted"


def test_stage_lookup_by_global_step():
    config = config_from_data({**minimal(), "stages": [{"name": "a", "steps": 3}, {"name": "b", "steps": 2}]})
    assert [config.stage_at(s)[1].name for s in range(5)] == ["a", "a", "a", "b", "b"]
    assert [config.stage_at(s)[2] for s in range(5)] == [0, 1, 2, 0, 1]
