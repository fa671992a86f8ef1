"""A SimpleTuner user's files as they are (issue #14): a config.json written with `--` flags
and SimpleTuner's keys (and the same as config.toml and config.env), and a dataloader file with a `text_embeds` backend, an object-form
`conditioning`, a `huggingface` backend on a local dataset saved by `datasets`, SimpleTuner's
cache keys and `resolution_type: pixel_area` with `crop: false`, over local images of several
aspect ratios. Each trains two steps with no edit, and what the keys say is what happens: the
text embeddings land in the text_embeds backend's folder, the latents in `cache_dir_vae`, the
dataset rows become training images, the buckets are the images' own aspect ratios."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slider_cn.config import ConfigError, load_config
from slider_cn.train import train

pytestmark = pytest.mark.slow

SHAPES = {"wide": (96, 64), "tall": (64, 96)}


def picture(size, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    array = np.full((h, w, 3), 240, np.uint8)
    x0, y0 = rng.integers(4, w // 3), rng.integers(4, h // 3)
    array[y0 : y0 + h // 2, x0 : x0 + w // 2] = rng.integers(0, 200, 3)
    return Image.fromarray(array)


def write_images(root: Path) -> None:
    for group in ("plus", "minus"):
        folder = root / "datasets" / group
        folder.mkdir(parents=True)
        for shape, size in SHAPES.items():
            for i in range(2):
                name = f"{group}-{shape}-{i}"
                picture(size, hash(name) % 1000).save(folder / f"{name}.png")
                (folder / f"{name}.txt").write_text(f"a {group} box", encoding="utf-8")


def write_hf_dataset(root: Path) -> Path:
    import datasets

    images = [picture(SHAPES["wide" if i % 2 else "tall"], 50 + i) for i in range(4)]
    data = datasets.Dataset.from_dict(
        {"image": images, "text": [f"a neutral box {i}" for i in range(4)]}
    ).cast_column("image", datasets.Image())
    folder = root / "datasets" / "hf-neutral"
    data.save_to_disk(str(folder))
    return folder


def dataloader(root: Path) -> list[dict]:
    """Written as SimpleTuner's DATALOADER.md documents it."""
    common = {
        "type": "local",
        "crop": False,
        "resolution": 64,
        "resolution_type": "pixel_area",
        "minimum_image_size": 32,
        "caption_strategy": "textfile",
        "prepend_instance_prompt": False,
        "only_instance_prompt": False,
        "skip_file_discovery": "",
        "preserve_data_backend_cache": True,
        "vae_cache_clear_each_epoch": False,
        "metadata_backend": "discovery",
        "repeats": 0,
    }
    return [
        {
            **common,
            "id": "plus",
            "instance_data_dir": "datasets/plus",
            "slider_strength": 1.0,
            "cache_dir_vae": "cache/vae/plus",
            "conditioning": {
                "type": "canny",
                "conditioning_type": "controlnet",
                "captions": ["an edge map"],
            },
        },
        {
            **common,
            "id": "minus",
            "instance_data_dir": "datasets/minus",
            "slider_strength": -1.0,
            "cache_dir_vae": "cache/vae/minus",
            "conditioning": [{"type": "canny", "low_threshold": 50, "high_threshold": 150}],
        },
        {
            "id": "neutral-hf",
            "type": "huggingface",
            "dataset_name": "datasets/hf-neutral",
            "caption_strategy": "huggingface",
            "metadata_backend": "huggingface",
            "image_column": "image",
            "caption_column": "text",
            "resolution": 64,
            "resolution_type": "pixel_area",
            "crop": False,
            "conditioning": {"type": "canny"},
        },
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": "cache/text",
            "disabled": False,
            "write_batch_size": 128,
        },
    ]


def simpletuner_config() -> dict:
    return {
        "--model_type": "lora",
        "--model_family": "sdxl",
        "--pretrained_model_name_or_path": "tiny",
        "--controlnet": True,
        "--data_backend_config": "multidatabackend.json",
        "--output_dir": "output/models",
        "--resolution": 64,
        "--resolution_type": "pixel_area",
        "--aspect_bucket_rounding": 2,
        "--minimum_image_size": 0,
        "--seed": 42,
        "--lora_rank": 4,
        "--learning_rate": "1e-3",
        "--max_train_steps": 2,
        "--num_train_epochs": 0,
        "--checkpointing_steps": 500,
        "--train_batch_size": 1,
        "--disable_benchmark": False,
        "--push_to_hub": "false",
        "--hub_model_id": "my-slider",
        "--validation_torch_compile": "false",
        "--mixed_precision": "no",
    }


def as_toml(values: dict) -> str:
    def value(v):
        return str(v).lower() if isinstance(v, bool) else json.dumps(v)

    return "".join(f'"{k}" = {value(v)}\n' for k, v in values.items())


def as_env(values: dict) -> str:
    """SimpleTuner's config.env: its variables, the rest in TRAINER_EXTRA_ARGS."""
    names = {
        "--model_type": "MODEL_TYPE",
        "--model_family": "MODEL_FAMILY",
        "--pretrained_model_name_or_path": "MODEL_NAME",
        "--data_backend_config": "DATALOADER_CONFIG",
        "--output_dir": "OUTPUT_DIR",
        "--resolution": "RESOLUTION",
        "--resolution_type": "RESOLUTION_TYPE",
        "--aspect_bucket_rounding": "ASPECT_BUCKET_ROUNDING",
        "--minimum_image_size": "MINIMUM_RESOLUTION",
        "--seed": "TRAINING_SEED",
        "--learning_rate": "LEARNING_RATE",
        "--max_train_steps": "MAX_NUM_STEPS",
        "--num_train_epochs": "NUM_EPOCHS",
        "--checkpointing_steps": "CHECKPOINTING_STEPS",
        "--train_batch_size": "TRAIN_BATCH_SIZE",
        "--push_to_hub": "PUSH_TO_HUB",
        "--hub_model_id": "HUB_MODEL_NAME",
        "--validation_torch_compile": "VALIDATION_TORCH_COMPILE",
        "--mixed_precision": "MIXED_PRECISION",
    }
    lines = [
        f"export {names[k]}='{str(v).lower() if isinstance(v, bool) else v}'"
        for k, v in values.items()
        if k in names
    ]
    extra = " ".join(
        f"{k}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in values.items()
        if k not in names
    )
    return "\n".join(["# SimpleTuner's config.env", *lines, f'export TRAINER_EXTRA_ARGS="{extra}"'])


@pytest.fixture()
def project(tmp_path):
    write_images(tmp_path)
    write_hf_dataset(tmp_path)
    (tmp_path / "multidatabackend.json").write_text(json.dumps(dataloader(tmp_path), indent=2))
    return tmp_path


def test_a_simpletuner_config_json_and_dataloader_train_as_they_are(project, monkeypatch):
    monkeypatch.chdir(project)
    (project / "config.json").write_text(json.dumps(simpletuner_config(), indent=2))
    config = load_config(project / "config.json")
    assert config.training_mode == "controlnet"
    # the same settings as config.toml and as config.env read as the same config
    (project / "config.toml").write_text(as_toml(simpletuner_config()))
    (project / "config.env").write_text(as_env(simpletuner_config()))
    for name in ("config.toml", "config.env"):
        assert load_config(project / name).model_dump() == config.model_dump(), name
    result = train(config)
    out = Path(result.output_dir)
    lines = [json.loads(line) for line in (out / "train_log.jsonl").open()]
    assert len(lines) == 2 and all(np.isfinite(line["loss"]) for line in lines)
    # the caches are where the dataloader says
    assert list((project / "cache" / "text").glob("*.safetensors"))
    assert list((project / "cache" / "vae" / "plus").glob("*.safetensors"))
    assert not (Path(config.cache_path) / "text").exists()
    # the dataset's rows became images with their captions; the buckets are the aspects
    from slider_cn.data.backends import training_backends

    backends = {b.id: b for b in training_backends(config, progress=False)}
    neutral = backends["neutral-hf"]
    assert sorted(s.caption for s in neutral.samples) == [f"a neutral box {i}" for i in range(4)]
    assert all(s.conditioning is not None for s in neutral.samples)
    buckets = {s.placement.bucket for b in backends.values() for s in b.samples}
    assert any(w > h for w, h in buckets) and any(w < h for w, h in buckets)


def test_simpletuner_keys_that_change_training_are_refused_by_name(project):
    entries = dataloader(project)
    entries[0]["is_regularisation_data"] = True
    entries[1]["type"] = "aws"
    (project / "multidatabackend.json").write_text(json.dumps(entries))
    (project / "config.json").write_text(json.dumps(simpletuner_config()))
    from slider_cn.data.config import load_backend_configs

    with pytest.raises(ConfigError) as error:
        load_backend_configs(project / "multidatabackend.json")
    message = str(error.value)
    assert "is_regularisation_data" in message and "neutral backend" in message
    assert "backend type 'aws' is not supported" in message
    entries = dataloader(project)
    entries[0]["crop_styel"] = "center"
    (project / "multidatabackend.json").write_text(json.dumps(entries))
    with pytest.raises(ConfigError, match="unknown key 'crop_styel'.*did you mean 'crop_style'"):
        load_backend_configs(project / "multidatabackend.json")


def test_instance_prompt_keys_and_a_rotated_16_bit_dataset_image(tmp_path):
    """prepend_instance_prompt / only_instance_prompt; an EXIF-rotated and a 16-bit image of a
    datasets dataset are written upright and in their own mode (trained as local files are)."""
    import datasets

    from slider_cn.data.backends import caption_for
    from slider_cn.data.config import BackendConfig
    from slider_cn.data.huggingface import materialise
    from slider_cn.image_files import open_rgb

    (tmp_path / "a.txt").write_text("a red box")
    base = {"id": "b", "instance_data_dir": ".", "instance_prompt": "photo of sks"}
    assert caption_for(
        tmp_path / "a.png",
        BackendConfig(**base, caption_strategy="textfile", prepend_instance_prompt=True),
    ) == ("photo of sks a red box")
    assert caption_for(
        tmp_path / "a.png",
        BackendConfig(**base, caption_strategy="instanceprompt", prepend_instance_prompt=True),
    ) == ("photo of sks")
    assert caption_for(tmp_path / "a.png", BackendConfig(**base, only_instance_prompt=True)) == (
        "photo of sks"
    )
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (80, 40), (200, 30, 30)).save(rotated, exif=exif)
    deep = Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40)
    deep_path = tmp_path / "deep.png"
    deep.save(deep_path)
    data = datasets.Dataset.from_dict(
        {"image": [str(rotated), str(deep_path)], "caption": ["r", "d"]}
    ).cast_column("image", datasets.Image())
    data.save_to_disk(str(tmp_path / "ds"))
    folder = materialise(
        BackendConfig(id="hf", type="huggingface", dataset_name=str(tmp_path / "ds")),
        tmp_path / "cache",
        progress=False,
    )
    assert open_rgb(folder / "000000.png").size == open_rgb(rotated).size == (40, 80)
    assert np.array_equal(np.array(open_rgb(folder / "000001.png")), np.array(open_rgb(deep_path)))
