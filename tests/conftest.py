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


def pytest_terminal_summary(terminalreporter):
    """Say loudly when the web UI's browser tests did not run (no chromium / chromedriver)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if any("BROWSER TESTS SKIPPED" in str(report.longrepr) for report in skipped):
        terminalreporter.write_sep(
            "!",
            "BROWSER TESTS SKIPPED: install chromium and chromium-driver (.ci/run does) to run "
            "tests/test_ui_browser.py",
            red=True,
            bold=True,
        )
