"""`slider-cn ui`'s API through FastAPI's test client: the form is the config's own schema,
errors and previews are the CLI's, paths stay in the workspace, tokens and upload limits hold,
and a crashed training child is reported while the server keeps serving."""

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from slider_cn.cli import main
from slider_cn.config import TrainConfig, load_config
from slider_cn.demo_data import write_demo_dataset
from slider_cn.ui.app import create_app
from slider_cn.ui.server import choose_token

WRITE = {"X-Slider-CN": "1"}


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    write_demo_dataset(root, images_per_group=2, resolution=32)
    return root


@pytest.fixture
def client(ws):
    with TestClient(create_app(ws), base_url="http://127.0.0.1") as client:
        yield client


def cli_lines(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def values_of(ws: Path, name="config.json"):
    return json.loads((ws / name).read_text())


# --- the form ----------------------------------------------------------------------------


def test_schema_is_the_config_schema_in_tabs(client):
    schema = client.get("/api/schema").json()
    assert [tab["name"] for tab in schema["tabs"]] == [
        "Model",
        "LoRA",
        "Data",
        "Training",
        "Validation",
    ]
    fields = {f["name"]: f for tab in schema["tabs"] for f in tab["fields"]}
    names = [f["name"] for tab in schema["tabs"] for f in tab["fields"]]
    assert sorted(names) == sorted(TrainConfig.model_fields)  # every key, exactly once
    for name, info in TrainConfig.model_fields.items():
        assert fields[name]["description"] == info.description
        assert fields[name]["default"] == info.default
    toggle = fields["slider_lora_target"]
    assert (toggle["tab"], toggle["label"], toggle["kind"]) == (
        "LoRA",
        "Slider LoRA Targeting",
        "bool",
    )
    assert fields["lora_rank"]["bounds"] == {"ge": 1}
    assert fields["training_mode"]["choices"] == ["lora", "controlnet"]
    assert "sd1x" in fields["model_family"]["choices"]
    backend = {f["name"] for f in schema["backend_fields"]}
    assert {"instance_data_dir", "slider_strength", "conditioning_data", "conditioning"} <= backend
    assert "canny" in {d["name"] for d in schema["detectors"]}


def test_config_round_trip_through_the_schema(client, ws):
    loaded = client.get("/api/config", params={"path": "config.json"}).json()
    assert loaded["values"] == values_of(ws)
    assert loaded["problems"]["message"] == ""
    values = {**loaded["values"], "lora_rank": 8, "slider_lora_target": False}
    saved = client.put("/api/config", json={"path": "copy.json", "values": values}, headers=WRITE)
    assert saved.status_code == 200, saved.text
    assert values_of(ws, "copy.json") == values
    again = client.get("/api/config", params={"path": "copy.json"}).json()["values"]
    assert again == values
    expected = load_config(ws / "config.json", {"lora_rank": "8", "slider_lora_target": "false"})
    assert load_config(ws / "copy.json") == expected
    assert saved.json()["resolved"] == expected.model_dump()


def test_field_errors_are_the_clis_and_nothing_is_written(client, ws, capsys, monkeypatch):
    bad = {
        **values_of(ws),
        "lora_rank": 0,
        "learning_rate": "fast",
        "resolution": 60,
        "lora_rnak": 4,
    }
    response = client.put("/api/config", json={"path": "bad.json", "values": bad}, headers=WRITE)
    assert response.status_code == 422
    assert not (ws / "bad.json").exists()
    problems = response.json()["problems"]
    assert set(problems["fields"]) == {"lora_rank", "learning_rate", "resolution"}
    # the same file given to the CLI: the same lines, word for word
    (ws / "bad.json").write_text(json.dumps(bad))
    monkeypatch.chdir(ws)
    code, _, err = cli_lines(capsys, ["train", "--config", "bad.json", "--plan", "1"])
    assert code == 2
    cli = err.removeprefix("slider-cn: error: ").strip().splitlines()
    assert sorted(cli) == sorted(problems["message"].splitlines())
    assert problems["fields"]["lora_rank"] == [
        line for line in cli if "'lora_rank'" in line and "unknown" not in line
    ]
    assert any("did you mean 'lora_rank'" in line for line in problems["general"])
    check = client.post(
        "/api/config/check", json={"path": "bad.json", "values": bad}, headers=WRITE
    )
    assert check.status_code == 422 and check.json()["problems"] == problems


def test_dataloader_round_trip_and_errors_per_backend(client, ws):
    original = client.get("/api/dataloader", params={"path": "multidatabackend.json"}).json()
    backends = original["backends"]
    assert [b["id"] for b in backends] == ["circle-plus", "circle-minus", "neutral"]
    broken = [
        {**backends[0], "slider_strength": "lots"},
        {**backends[1], "instance_data_dir": "data/nowhere"},
        backends[2],
    ]
    before = (ws / "multidatabackend.json").read_text()
    response = client.put(
        "/api/dataloader",
        json={"path": "multidatabackend.json", "backends": broken},
        headers=WRITE,
    )
    assert response.status_code == 422
    assert (ws / "multidatabackend.json").read_text() == before
    problems = response.json()["problems"]
    assert list(problems["backends"]["0"]) == ["slider_strength"]
    assert (
        "multidatabackend.json: backend #0 ('circle-plus'): key 'slider_strength'"
        in (problems["backends"]["0"]["slider_strength"][0])
    )
    renamed = [{**b, "repeats": 1} for b in backends]
    response = client.put(
        "/api/dataloader",
        json={"path": "sub/loader.json", "backends": renamed},
        headers=WRITE,
    )
    assert response.status_code == 422  # data/plus is not there relative to sub/
    assert not (ws / "sub").exists()  # the folder made for the check is gone again
    response = client.put(
        "/api/dataloader",
        json={"path": "multidatabackend.json", "backends": renamed},
        headers=WRITE,
    )
    assert response.status_code == 200
    assert json.loads((ws / "multidatabackend.json").read_text()) == renamed


# --- previews equal the CLI's ----------------------------------------------------------------


def test_targets_equal_the_cli_json(client, ws, capsys):
    values = values_of(ws)
    for slider in (True, False):
        response = client.post(
            "/api/targets",
            json={"path": "config.json", "values": {**values, "slider_lora_target": slider}},
            headers=WRITE,
        )
        assert response.status_code == 200, response.text
        data = response.json()
        override = ["--slider_lora_target", str(slider).lower()]
        code, out, _ = cli_lines(
            capsys, ["targets", "--config", str(ws / "config.json"), "--json", *override]
        )
        assert code == 0
        assert data["report"] == json.loads(out)
        assert [m["name"] for m in data["modules"]] == data["report"]["adapted"]
        has_cross_attention = any("attn2" in name for name in data["report"]["adapted"])
        assert has_cross_attention is (not slider)


def test_plan_equals_the_cli_plan(client, ws, capsys):
    response = client.post(
        "/api/plan",
        json={"path": "config.json", "values": values_of(ws), "count": 7},
        headers=WRITE,
    )
    assert response.status_code == 200, response.text
    data = response.json()
    code, out, _ = cli_lines(capsys, ["train", "--config", str(ws / "config.json"), "--plan", "7"])
    assert code == 0
    assert data["lines"] == [json.loads(line) for line in out.splitlines()]
    assert "".join(line["sign"] for line in data["lines"]) == "+-0+-0+"
    first = data["pairs"][0][0]
    assert first["image"].startswith("data/plus/") and first["conditioning"] is None
    thumb = client.get("/api/thumb", params={"path": first["image"], "size": 64})
    assert thumb.status_code == 200 and thumb.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_shows_balance_errors_as_the_cli(client, ws, capsys):
    backends = json.loads((ws / "multidatabackend.json").read_text())
    backends[1]["repeats"] = 1
    (ws / "multidatabackend.json").write_text(json.dumps(backends))
    response = client.post(
        "/api/plan",
        json={"path": "config.json", "values": values_of(ws), "count": 3},
        headers=WRITE,
    )
    assert response.status_code == 422
    code, _, err = cli_lines(capsys, ["train", "--config", str(ws / "config.json"), "--plan", "3"])
    assert code == 2
    message = response.json()["problems"]["message"]
    assert "positive group holds 2 samples" in message
    assert err.strip() == f"slider-cn: error: {message}"


# --- safety ----------------------------------------------------------------------------------


def test_paths_stay_in_the_workspace(client, ws, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (ws / "escape").symlink_to(outside)  # a symlink inside that leads out
    refused = [
        client.get("/api/files", params={"path": ".."}),
        client.get("/api/file", params={"path": "../outside/secret.txt"}),
        client.get("/api/file", params={"path": "data/../../outside/secret.txt"}),
        client.get("/api/file", params={"path": str(outside / "secret.txt")}),
        client.get("/api/file", params={"path": "/etc/passwd"}),
        client.get("/api/file", params={"path": "escape/secret.txt"}),
        client.get("/api/files", params={"path": "escape"}),
        client.get("/api/thumb", params={"path": "escape/secret.txt"}),
        client.get("/api/config", params={"path": "escape/config.json"}),
        client.put(
            "/api/config",
            json={"path": "../evil.json", "values": {}},
            headers=WRITE,
        ),
        client.put(
            "/api/config",
            json={"path": "escape/evil.json", "values": {}},
            headers=WRITE,
        ),
        client.put(
            "/api/dataloader",
            json={"path": "escape/evil.json", "backends": []},
            headers=WRITE,
        ),
        client.put("/api/upload", params={"path": "escape/evil.png"}, content=b"x", headers=WRITE),
        client.put("/api/upload", params={"path": "../evil.png"}, content=b"x", headers=WRITE),
    ]
    for response in refused:
        assert response.status_code == 403, (response.request.url, response.text)
        assert "secret" not in response.text.replace("secret.txt", "")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert not (tmp_path / "evil.json").exists() and not (tmp_path / "evil.png").exists()
    assert client.get("/api/file", params={"path": "nothing.txt"}).status_code == 404
    listing = client.get("/api/files", params={"path": ""}).json()["entries"]
    assert "escape" not in {e["name"] for e in listing}  # the escape is not even listed
    assert client.get("/api/file", params={"path": "config.json"}).status_code == 200

    # a config whose output_dir or backend folders lie outside is refused before anything runs
    values = {**values_of(ws), "output_dir": str(outside / "run")}
    for endpoint in ("/api/targets", "/api/plan"):
        response = client.post(
            endpoint, json={"path": "config.json", "values": values}, headers=WRITE
        )
        assert response.status_code == 403
        assert "outside the workspace" in response.json()["problems"]["fields"]["output_dir"][0]
    (ws / "far.json").write_text(json.dumps(values))
    response = client.post("/api/job/start", json={"path": "far.json"}, headers=WRITE)
    assert response.status_code == 403
    backends = json.loads((ws / "multidatabackend.json").read_text())
    backends[0]["instance_data_dir"] = "escape"
    response = client.put(
        "/api/dataloader",
        json={"path": "multidatabackend.json", "backends": backends},
        headers=WRITE,
    )
    assert response.status_code == 403
    assert (
        "outside the workspace"
        in response.json()["problems"]["backends"]["0"]["instance_data_dir"][0]
    )
    assert client.get("/api/job").json()["state"] == "idle"
    assert not (outside / "run").exists()


def test_token_is_required_on_every_request(ws):
    app = create_app(ws, token="s3cret-token")
    with TestClient(app, base_url="http://192.0.2.7:7860") as client:
        for path in ("/", "/api/info", "/api/schema", "/static/app.js", "/api/job"):
            assert client.get(path).status_code == 403
        assert client.get("/api/info", headers={"X-Slider-Token": "wrong"}).status_code == 403
        assert (
            client.get("/api/info", headers={"X-Slider-Token": "s3cret-token"}).status_code == 200
        )
        bearer = {"Authorization": "Bearer s3cret-token"}
        assert client.get("/api/info", headers=bearer).status_code == 200
        response = client.put(
            "/api/config", json={"path": "x.json", "values": {}}, headers={"X-Slider-CN": "1"}
        )
        assert response.status_code == 403 and not (ws / "x.json").exists()
        # the printed URL's ?token= sets a same-site cookie that the page's requests then carry
        page = client.get("/", params={"token": "s3cret-token"})
        assert page.status_code == 200 and "SameSite=Strict" in page.headers["set-cookie"]
        assert client.get("/api/info").status_code == 200
    assert choose_token("0.0.0.0", None)  # off loopback a token is made up when none is given
    assert choose_token("127.0.0.1", None) is None
    assert choose_token("127.0.0.1", "given") == "given"


def test_loopback_server_checks_host_and_write_header(client, ws):
    assert client.get("/api/info", headers={"Host": "evil.example:7860"}).status_code == 403
    assert client.get("/api/info", headers={"Host": "localhost:7860"}).status_code == 200
    # a cross-site form post cannot add the header: refused before it reaches anything
    response = client.put("/api/config", json={"path": "x.json", "values": {}})
    assert response.status_code == 403 and not (ws / "x.json").exists()
    page = client.get("/")
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_uploads_are_limited_in_size(ws):
    with TestClient(create_app(ws, max_upload_bytes=1000), base_url="http://127.0.0.1") as client:
        response = client.put(
            "/api/upload", params={"path": "up/big.png"}, content=b"x" * 2000, headers=WRITE
        )
        assert response.status_code == 413
        assert not (ws / "up" / "big.png").exists()
        assert not any(p.name.startswith(".slider-cn-ui-") for p in ws.rglob("*"))

        def chunks():  # no Content-Length: counted while it streams in
            for _ in range(3):
                yield b"y" * 400

        response = client.put(
            "/api/upload", params={"path": "up/streamed.png"}, content=chunks(), headers=WRITE
        )
        assert response.status_code == 413 and not (ws / "up" / "streamed.png").exists()
        response = client.put(
            "/api/upload", params={"path": "up/small.png"}, content=b"z" * 500, headers=WRITE
        )
        assert response.status_code == 200 and (ws / "up" / "small.png").read_bytes() == b"z" * 500


def test_page_and_assets_are_served_offline(client):
    page = client.get("/").text
    assert "/static/app.js" in page and "/static/style.css" in page
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    for text in (page, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "https://" not in text and "//cdn" not in text


def test_preprocess_runs_the_cli_on_a_workspace_folder(client, ws):
    body = {"detector": "canny", "input": "data/plus", "output": "canny/plus"}
    response = client.post(
        "/api/preprocess", json={**body, "params": {"low_threshold": 50}}, headers=WRITE
    )
    assert response.status_code == 200 and response.json()["ok"], response.text
    assert sorted(p.name for p in (ws / "canny" / "plus").glob("*.png")) == [
        "plus_000.png",
        "plus_001.png",
    ]
    wrong = client.post("/api/preprocess", json={**body, "params": {"safe": True}}, headers=WRITE)
    assert wrong.status_code == 422 and "does not apply to detector 'canny'" in wrong.text
    out = client.post("/api/preprocess", json={**body, "output": "../canny"}, headers=WRITE)
    assert out.status_code == 403


# --- a crashed child ------------------------------------------------------------------------


def wait_for(client, states, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        snap = client.get("/api/job").json()
        if snap["state"] in states:
            return snap
        time.sleep(0.3)
    raise AssertionError(f"job never reached {states}: {snap}")


def test_a_crashed_run_is_reported_and_the_server_keeps_serving(client, ws):
    # positive and negative groups of different sizes: the child refuses to train (exit 2)
    backends = json.loads((ws / "multidatabackend.json").read_text())
    backends[1]["repeats"] = 1
    (ws / "multidatabackend.json").write_text(json.dumps(backends))
    response = client.post("/api/job/start", json={"path": "config.json"}, headers=WRITE)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "running"
    second = client.post("/api/job/start", json={"path": "config.json"}, headers=WRITE)
    assert second.status_code == 409 and "one at a time" in second.json()["detail"]
    snap = wait_for(client, ("failed", "finished", "stopped"))
    assert snap["state"] == "failed" and snap["exit_code"] == 2
    tail = "\n".join(snap["log_tail"])
    assert "slider-cn: error:" in tail and "positive group holds 2 samples" in tail
    assert "exit code 2" in snap["message"]
    # still serving, and the next run may start
    assert client.get("/api/schema").status_code == 200
    resume = client.post(
        "/api/job/start", json={"path": "config.json", "resume": True}, headers=WRITE
    )
    assert resume.status_code == 409 and "nothing to resume" in resume.json()["detail"]
    events = client.get("/api/job/events")  # a finished run: one snapshot, then the end
    assert '"state": "failed"' in events.text and "event: end" in events.text
