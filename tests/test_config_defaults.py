"""An installed medfusion (no pipelines/ beside it) runs with PipelineConfig()'s built-in defaults;
they must be the same pipeline as pipelines/default.yaml, or an installed run would silently differ."""

from __future__ import annotations

from pathlib import Path

from medfusion.config import PipelineConfig, load_yaml_model


def test_default_yaml_equals_the_built_in_defaults() -> None:
    path = Path(__file__).resolve().parents[1] / "pipelines" / "default.yaml"
    assert load_yaml_model(path, PipelineConfig).model_dump() == PipelineConfig().model_dump()
