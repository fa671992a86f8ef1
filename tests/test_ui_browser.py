"""`slider-cn ui` in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): toggle Slider LoRA Targeting and see the targets change, add a positive and a
negative backend and see the plan cycle + - 0, start a tiny run, stop it, resume it, watch it
reach its last step and see the strength-sweep grid appear.

One server and one browser serve the whole module; the tests run in file order and build on one
another, as a user's session would. Without chromium and chromedriver the module is skipped,
loudly (see tests/conftest.py's summary line); `.ci/run` installs both.

SLIDER_CN_UI_SCREENSHOT=docs/images/web_ui.png keeps the screenshot the last test makes.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SKIP_REASON = (
    "BROWSER TESTS SKIPPED: chromium and chromedriver are not installed "
    "(apt-get install chromium chromium-driver; .ci/run installs them)"
)
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(SKIP_REASON, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

STEPS = 24  # a stop clicked after step 1 lands well before the end, even on a fast machine
SCREENSHOT_ENV = "SLIDER_CN_UI_SCREENSHOT"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from slider_cn.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("ui") / "ws"
    write_demo_dataset(root, images_per_group=2, resolution=32)
    config = json.loads((root / "config.json").read_text())
    config.update(
        resolution=32,
        slider_lora_target=False,  # the user switches it on
        max_train_steps=STEPS,
        checkpointing_steps=100,
        validation_steps=STEPS,
        validation_prompt="a circle",
        validation_num_inference_steps=2,
    )
    (root / "config.json").write_text(json.dumps(config, indent=2))
    # only the neutral backend: the user adds the positive and the negative ones
    backends = json.loads((root / "multidatabackend.json").read_text())
    (root / "multidatabackend.json").write_text(json.dumps(backends[2:], indent=2))
    return root


@pytest.fixture(scope="module")
def server(workspace):
    import uvicorn

    from slider_cn.ui.app import create_app
    from slider_cn.ui.server import bind

    sock = bind("127.0.0.1", 0)
    app = create_app(workspace)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/", app
    server.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait(condition, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = condition()
        except StaleElementReferenceException:
            last = None
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def text(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css).text


def target_names(driver):
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#targets-list td.module")]


def open_page(driver, url):
    driver.get(url)
    wait(lambda: driver.execute_script("return document.body.dataset.ready"), what="the page")


def test_slider_lora_targeting_changes_the_target_list(server, browser):
    url, _ = server
    open_page(browser, url)
    browser.find_element(By.ID, "tab-button-LoRA").click()
    toggle = browser.find_element(By.ID, "field-slider_lora_target")
    switch = browser.find_element(By.CSS_SELECTOR, "#wrap-slider_lora_target label.toggle")
    assert switch.is_displayed() and not toggle.is_selected()
    label = text(browser, "#wrap-slider_lora_target label.name")
    assert label.startswith("Slider LoRA Targeting")
    # off: the family's ordinary LoRA targets, cross-attention included
    wait(lambda: any("attn2" in n for n in target_names(browser)), what="attn2 in the targets")
    ordinary = target_names(browser)
    switch.click()
    assert toggle.is_selected()
    wait(
        lambda: (
            target_names(browser)
            and not any("attn2" in n for n in target_names(browser))
            and browser.find_element(By.ID, "targets-table").get_attribute("data-slider") == "true"
        ),
        what="slider targets without attn2",
    )
    slider = target_names(browser)
    assert slider != ordinary and any("attn1" in n for n in slider)
    assert "slider targets" in text(browser, "#targets-summary")

    # a bad value: the CLI's message under the field, the tab marked
    rank = browser.find_element(By.ID, "field-lora_rank")
    rank.clear()
    rank.send_keys("0")
    wait(
        lambda: (
            "key 'lora_rank': Input should be greater than or equal to 1"
            in text(browser, "#error-lora_rank")
        ),
        what="the error on lora_rank",
    )
    assert "has-error" in browser.find_element(By.ID, "tab-button-LoRA").get_attribute("class")
    rank.clear()
    rank.send_keys("4")
    wait(lambda: not text(browser, "#error-lora_rank"), what="the error to clear")


def test_add_positive_and_negative_backends_and_see_the_plan(server, browser, workspace):
    browser.find_element(By.ID, "tab-button-Data").click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#backends .backend")) == 1
    browser.find_element(By.ID, "add-positive").click()
    browser.find_element(By.ID, "backend-1-instance_data_dir").send_keys("data/plus")
    browser.find_element(By.ID, "add-negative").click()
    browser.find_element(By.ID, "backend-2-instance_data_dir").send_keys("data/minus")
    browser.find_element(By.ID, "preview-tab-plan").click()
    browser.find_element(By.ID, "plan-run").click()
    rows = wait(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#plan-list tr"), what="the plan rows"
    )
    signs = [row.find_element(By.CSS_SELECTOR, "td.sign").text for row in rows]
    assert signs[:6] == ["+", "-", "0", "+", "-", "0"]
    assert "3 training backends" in text(browser, "#plan-status")
    thumbs = browser.find_elements(By.CSS_SELECTOR, "#plan-list img")
    wait(
        lambda: all(browser.execute_script("return arguments[0].naturalWidth", t) for t in thumbs),
        what="the plan's thumbnails",
    )
    saved = json.loads((workspace / "multidatabackend.json").read_text())
    assert [(b["instance_data_dir"], b.get("slider_strength")) for b in saved] == [
        ("data/neutral", None),
        ("data/plus", 1),
        ("data/minus", -1),
    ]


def step_of(driver) -> int:
    done = text(driver, "#job-step").split("/")[0].strip()
    return int(done) if done.isdigit() else 0


def test_run_stop_resume_progress_and_sweep(server, browser, workspace):
    url, app = server
    browser.find_element(By.ID, "job-start").click()
    wait(lambda: text(browser, "#job-state") == "running", what="the run to start")
    assert json.loads((workspace / "config.json").read_text())["slider_lora_target"] is True
    wait(lambda: step_of(browser) >= 1, timeout=180, what="the first step")
    browser.find_element(By.ID, "job-stop").click()
    wait(lambda: text(browser, "#job-state") == "stopped", timeout=120, what="the stop")
    stopped_at = step_of(browser)
    assert 1 <= stopped_at < STEPS
    assert f"checkpoint-{stopped_at} saved" in text(browser, "#job-message")
    assert (workspace / "output" / f"checkpoint-{stopped_at}").is_dir()

    resume = browser.find_element(By.ID, "job-resume")
    assert resume.is_enabled()
    resume.click()
    wait(lambda: text(browser, "#job-state") == "running", what="the resumed run")
    assert app.state.runner.job.args[-2:] == ["--resume_from_checkpoint", "latest"]

    # a second tab attaches to the same run
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    open_page(browser, url)
    wait(
        lambda: (
            text(browser, "#job-state") in ("running", "finished")
            and step_of(browser) >= stopped_at
        ),
        what="the second tab to show the run",
    )
    browser.close()
    browser.switch_to.window(first)

    wait(lambda: text(browser, "#job-state") == "finished", timeout=240, what="the end")
    assert text(browser, "#job-step") == f"{STEPS} / {STEPS}"
    assert text(browser, "#job-loss") != "-"
    assert browser.find_elements(By.CSS_SELECTOR, "#loss-curve polyline")
    sweep = wait(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#outputs-validation figure.sweep img"),
        timeout=30,
        what="the sweep grid",
    )
    assert f"step-{STEPS:06d}" in text(browser, "#outputs-validation")
    wait(
        lambda: browser.execute_script("return arguments[0].naturalWidth", sweep[0]) > 0,
        what="the sweep image to load",
    )
    files = text(browser, "#outputs-files")
    assert "pytorch_lora_weights.safetensors" in files and "load_lora_weights" in files
    log = [json.loads(line) for line in (workspace / "output" / "train_log.jsonl").open()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))

    browser.find_element(By.CSS_SELECTOR, "button.export[data-format='kohya']").click()
    wait(
        lambda: "written: output/export/" in text(browser, "#export-result"),
        timeout=120,
        what="the kohya export",
    )

    # the picture for the README: the LoRA tab, targets, progress and the sweep in one view
    browser.find_element(By.ID, "tab-button-LoRA").click()
    browser.find_element(By.ID, "preview-tab-plan").click()
    shot = save_screenshot(browser, workspace.parent / "web_ui.png")
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])


def save_screenshot(driver, path: Path) -> Path:
    """The page from the top, reduced to a small palette (README pictures stay under 150 KB)."""
    from PIL import Image

    driver.set_window_size(1400, 1120)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    raw = path.with_suffix(".raw.png")
    driver.save_screenshot(str(raw))
    with Image.open(raw) as image:
        small = image.convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT)
        small.save(path, optimize=True)
    assert path.stat().st_size < 150_000
    return path
