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


@pytest.mark.parametrize("name", ["test-tiny.toml", "toyworld-default.toml", "duet-tiny.toml", "duet-toyworld.toml",
                                  "mmi-tiny.toml", "mmi-toyworld.toml",
                                  "diag-tiny-world.toml"])
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


def _family_config(family: str) -> dict:
    return {"model": {"family": family}, **minimal()}


def test_loss_weights_name_the_familys_own_parts():
    from tapestry.train.loss import part_weights

    # mmi's image part is "image": weighed through loss_weights, and flow_weight cannot reach it
    config = config_from_data(_family_config("mmi"), ["stages.0.loss_weights={image = 10.0}"])
    assert part_weights(config.stages[0], ("text", "image")) == {"text": 1.0, "image": 10.0}
    with pytest.raises(TrainConfigError, match=r"stages.0.flow_weight: family 'mmi' has no loss part 'flow' "
                                               r"\(its parts: \['text', 'image'\]\)"):
        config_from_data(_family_config("mmi"), ["stages.0.flow_weight=10"])
    with pytest.raises(TrainConfigError, match=r"stages.0.loss_weights: family 'mot' has no loss part 'nip'"):
        config_from_data(minimal(), ["stages.0.loss_weights={nip = 2.0}"])
    with pytest.raises(TrainConfigError, match=r"stages.0.text_weight: must be >= 0"):
        config_from_data(minimal(), ["stages.0.text_weight=-1"])
    # mot keeps the named shortcuts; loss_weights wins over them
    stage = config_from_data(minimal(), ["stages.0.flow_weight=2", "stages.0.loss_weights={text = 0.5}"]).stages[0]
    assert part_weights(stage, ("text", "flow")) == {"text": 0.5, "flow": 2.0}


def test_loss_totals_follow_the_declared_parts():
    from tapestry.models import family as families
    from tapestry.train.loss import loss_totals

    mmi = families.get("mmi")
    assert list(loss_totals(mmi, {"image": 4, "text": 7})) == ["text", "image"]
    with pytest.raises(ValueError, match=r"declares loss parts \['text', 'image'\] but counted \['flow', 'text'\]"):
        loss_totals(mmi, {"text": 1, "flow": 2})


def test_progress_lines_show_whatever_parts_a_family_has(capsys):
    from tapestry.train.metrics import Progress

    progress = Progress(total=4, start=0, quiet=False)
    progress.update(1, {"loss": 3.0, "text_loss": 1.0, "image_loss": 0.2, "val_text_loss": 9.0, "lr": 1e-3,
                        "tokens_per_s": 12.0})
    line = capsys.readouterr().err
    assert "text 1.0000  image 0.2000" in line and "flow" not in line and "val_text" not in line


def test_noise_copies_reach_the_layout_and_must_be_positive():
    from tapestry.train.loop import layout_for

    config = config_from_data(minimal(), ["layout.noise_copies=3"])
    assert config.layout.noise_copies == 3
    with pytest.raises(TrainConfigError, match=r"layout.noise_copies: must be >= 1"):
        config_from_data(minimal(), ["layout.noise_copies=0"])
    from tapestry.models.mot.config import LatentConfig, LLMConfig, MoTConfig

    class Codec:
        downsample = 4

    model_config = MoTConfig(llm=LLMConfig(), vit=None, latent=LatentConfig(channels=4)).validate()
    assert layout_for(config, model_config, Codec()).noise_copies == 3


def test_focus_weight_is_checked_at_load_against_its_family():
    assert config_from_data(minimal(), ["data.focus_weight=4"]).data.focus_weight == 4.0
    with pytest.raises(TrainConfigError, match=r"data.focus_weight: must be >= 0"):
        config_from_data(minimal(), ["data.focus_weight=-1"])
    with pytest.raises(TrainConfigError, match=r"data.focus_weight: the mmi family does not weigh"):
        load_config(CONFIGS / "mmi-tiny.toml", ["data.focus_weight=2"])
