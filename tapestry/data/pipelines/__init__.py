"""Named pipelines. A pipeline is a class with `name`, `version`, `config_class`,
`input_suffixes`, `stages` (the order its statistics are shown in) and
`process(item, provider) -> InputResult`; executors only ever see that."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tapestry.data.pipelines import config as config_io
from tapestry.data.pipelines.duet_synthetic import DuetSynthetic
from tapestry.data.pipelines.image_inline import ImageInline
from tapestry.data.pipelines.incontext_synth import IncontextSynth
from tapestry.data.pipelines.video_state_change import VideoStateChange
from tapestry.data.pipelines.video_story import VideoStory
from tapestry.data.pipelines.web_howto import WebHowto
from tapestry.errors import TapestryError

PIPELINES: dict[str, type] = {cls.name: cls for cls in (VideoStory, VideoStateChange, ImageInline, WebHowto,
                                                              IncontextSynth, DuetSynthetic)}


def pipeline_class(name: str) -> type:
    if name not in PIPELINES:
        raise TapestryError(f"unknown pipeline {name!r} (known: {', '.join(sorted(PIPELINES))})")
    return PIPELINES[name]


def build_config(name: str, config_file: str | Path | None = None, overrides: list[str] | None = None,
                 seed: int | None = None) -> Any:
    """The config of pipeline `name`: defaults, then a JSON file, then `--set` overrides, then seed."""
    cls = pipeline_class(name)
    values = config_io.to_dict(cls.config_class())
    if config_file is not None:
        try:
            loaded = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except OSError as e:
            raise TapestryError(f"--config {config_file}: cannot read: {e.strerror or e}") from None
        except ValueError as e:
            raise TapestryError(f"--config {config_file}: not valid JSON: {e}") from None
        values = _merge(values, loaded, str(config_file))
    if overrides:
        values = config_io.apply_overrides(values, overrides)
    if seed is not None:
        values["seed"] = seed
    return config_io.from_dict(cls.config_class, values)


def build_pipeline(name: str, config: Any) -> Any:
    return pipeline_class(name)(config)


def _merge(base: dict[str, Any], update: Any, where: str) -> dict[str, Any]:
    if not isinstance(update, dict):
        raise TapestryError(f"{where}: expected a JSON object")
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{where}: {key}")
        else:
            out[key] = value
    return out
