"""Two CPU processes under torchrun (gloo): LyCORIS in both modes, exact resume of every rank's
noise, and bad data on one rank stopping both without a hang or a checkpoint-0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slider_cn.config import TrainConfig
from slider_cn.demo_data import write_demo_dataset
from slider_cn.families import get_family

pytestmark = pytest.mark.slow

LOKR = Path(__file__).parents[1] / "configs" / "lycoris_config.json"
_PORTS = iter(range(29531, 29600))


def torchrun(config: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(next(_PORTS)), "-m", "slider_cn.cli", "train", "--config",
           str(config), *overrides]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def rank_logs(output: Path) -> list[list[dict]]:
    return [
        [json.loads(line) for line in (output / name).read_text().splitlines()]
        for name in ("train_log.jsonl", "train_log.rank1.jsonl")
    ]


@pytest.mark.parametrize("mode", ["lora", "controlnet"])
def test_lycoris_trains_on_two_processes(tmp_path, mode):
    """LyCORIS weights live beside the model: DDP has nothing to wrap in LoRA mode (nor in
    ControlNet mode with an existing ControlNet), and their gradients are averaged by hand."""
    paths = write_demo_dataset(tmp_path, images_per_group=2, conditioning="folders")
    overrides = ["--max_train_steps", "2", "--lora_type", "lycoris", "--lycoris_config", str(LOKR)]
    overrides += ["--training_mode", mode]
    if mode == "controlnet":
        family = get_family(TrainConfig(seed=0))
        folder = tmp_path / "controlnet"
        family.fresh_controlnet(family.load_components().denoiser).save_pretrained(str(folder))
        overrides += ["--controlnet_model_name_or_path", str(folder)]
    done = torchrun(paths["config"], *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = rank_logs(tmp_path / "output")
    assert [r["sign"] for r in ranks[0]] == [r["sign"] for r in ranks[1]] == ["+", "-"]
    assert (tmp_path / "output" / "slider_lycoris.safetensors").is_file()


def test_two_process_resume_reproduces_every_rank(tmp_path):
    whole = write_demo_dataset(tmp_path / "whole", images_per_group=4)
    part = write_demo_dataset(tmp_path / "part", images_per_group=4)
    assert torchrun(whole["config"], "--max_train_steps", "4").returncode == 0
    first = torchrun(part["config"], "--max_train_steps", "2", "--checkpointing_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(
        part["config"], "--max_train_steps", "4", "--resume_from_checkpoint", "latest"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for a, b in zip(rank_logs(tmp_path / "whole" / "output"), rank_logs(tmp_path / "part" / "output"), strict=True):  # fmt: skip
        names = [[Path(f).name for f in line["files"]] for line in a]
        assert names == [[Path(f).name for f in line["files"]] for line in b]
        assert [line["loss"] for line in a] == pytest.approx([line["loss"] for line in b], rel=1e-5)


def test_bad_data_on_one_rank_stops_both_without_a_checkpoint(tmp_path):
    paths = write_demo_dataset(tmp_path, images_per_group=2)
    # the first micro-batch (+) takes both plus images, one per rank: corrupt one of them
    bad = sorted((tmp_path / "data" / "plus").glob("*.png"))[1]
    good = bad.read_bytes()
    bad.write_bytes(b"not a png")
    done = torchrun(paths["config"], "--max_train_steps", "2", timeout=240)
    assert done.returncode != 0
    assert bad.name in done.stderr
    assert not list((tmp_path / "output").glob("checkpoint-*"))
    # fixed, the same command starts cleanly (no checkpoint-0 in the way)
    bad.write_bytes(good)
    again = torchrun(paths["config"], "--max_train_steps", "2")
    assert again.returncode == 0, again.stderr[-3000:]


def test_inline_conditioning_is_made_once_by_the_main_process(tmp_path):
    """Both ranks need the generated canny maps; the main process makes them while the other
    waits, then finds them in the cache (no two writers on one folder and manifest)."""
    paths = write_demo_dataset(tmp_path, images_per_group=2, conditioning="inline")
    done = torchrun(paths["config"], "--max_train_steps", "2", "--training_mode", "controlnet")
    assert done.returncode == 0, done.stderr[-3000:]
    generated = list((tmp_path / "output" / "cache" / "conditioning").rglob("*.png"))
    assert len(generated) == 6  # 3 groups x 2 images, written once
    assert not list((tmp_path / "output" / "cache" / "conditioning").rglob("*.tmp*"))
