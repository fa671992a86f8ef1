"""Training under mixed precision on the CPU: ControlNet mode, whose trained ControlNet is
accelerate-prepared (its outputs come back in fp32) and feeds a bf16 UNet."""

import json
from pathlib import Path

import pytest
import torch

from slider_cn.config import load_config
from slider_cn.demo_data import write_demo_dataset
from slider_cn.train import train


@pytest.fixture
def fresh_accelerate_state():
    # accelerate keeps one process-wide state, fixed by the first Accelerator's precision:
    # start from none, and leave none for the fp32 runs of other tests.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.slow
def test_controlnet_mode_trains_in_bf16(tmp_path, fresh_accelerate_state):
    paths = write_demo_dataset(tmp_path, images_per_group=2, resolution=64, conditioning="folders")
    config = load_config(
        paths["config"],
        {
            "training_mode": "controlnet",
            "mixed_precision": "bf16",
            "max_train_steps": "2",
            "checkpointing_steps": "100",
        },
    )
    result = train(config)
    assert result.steps == 2
    lines = (Path(config.output_dir) / "train_log.jsonl").read_text().splitlines()
    assert all(torch.isfinite(torch.tensor(json.loads(line)["loss"])) for line in lines)
