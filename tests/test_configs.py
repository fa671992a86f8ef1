"""The example configs in configs/ stay valid as the schema changes."""

import json
from pathlib import Path

import pytest

from slider_cn.config import TrainConfig, _normalise_key
from slider_cn.data.config import BackendConfig

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_example_config_matches_the_schema(path):
    raw = json.loads(path.read_text())
    if isinstance(raw, list):
        for entry in raw:
            BackendConfig.model_validate(entry)
    elif "algo" in raw:
        assert raw["algo"]  # lycoris presets are checked by tests/test_adapters.py
    elif "model_family" in raw:
        TrainConfig.model_validate({_normalise_key(k): v for k, v in raw.items()})
