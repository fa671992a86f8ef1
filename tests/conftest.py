import os

import pytest

# Tests never touch the network: tiny models only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def demo(tmp_path):
    """A small contrastive dataset with its training and dataloader configs."""
    from slider_cn.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path / "demo", images_per_group=2, resolution=64)
