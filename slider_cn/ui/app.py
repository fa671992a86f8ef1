"""The web UI's HTTP side: a FastAPI app over one workspace (`create_app`).

Pages and API (JSON) are served by the same app; the page is static HTML, CSS and a small
script of our own (`static/`), so it works offline. What the API does is the CLI's: configs are
validated by `load_config`, dataloaders by `load_backend_configs`, targets come from
`slider-cn targets`' report, the plan from the sampler's `preview`, runs are `slider-cn train`
child processes, exports and conditioning `slider-cn export` / `slider-cn preprocess` ones.

Safety (docs/design.md §11):
- every path goes through `Workspace.resolve` (no `..`, no symlink escape; 403), and a config
  whose files lie outside the workspace is refused before anything reads them;
- with a token (required off loopback), every request must carry it: the `X-Slider-Token`
  header, `?token=` (which also sets a same-site cookie, so the page's images and event stream
  carry it) or that cookie; without a token the Host header must name a loopback host (a web
  page elsewhere cannot reach the server through DNS rebinding);
- requests that change something must carry the `X-Slider-CN` header, which a page of another
  origin cannot add without a CORS preflight this server never grants;
- uploads are limited in size (413 before anything is written).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import subprocess
import sys
import tempfile
from contextlib import asynccontextmanager, contextmanager, suppress
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders

from slider_cn.config import load_config
from slider_cn.errors import ConfigError, read_json
from slider_cn.ui import checks
from slider_cn.ui.checks import CheckFailed, Problems
from slider_cn.ui.jobs import JobRefused, JobRunner, tail_lines
from slider_cn.ui.outputs import run_outputs
from slider_cn.ui.workspace import PathMissing, PathRefused, Workspace

TOKEN_HEADER = "x-slider-token"
TOKEN_COOKIE = "slider_cn_token"
WRITE_HEADER = "x-slider-cn"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_UPLOAD = 50 * 1024 * 1024
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
    "object-src 'none'; frame-ancestors 'none'",
}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Guard:
    """ASGI middleware: the token, the Host check and the write header (see the module doc)."""

    def __init__(self, app, token: str | None, allowed_hosts: tuple[str, ...]):
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await JSONResponse({"detail": refusal}, status_code=403)(scope, receive, send)
            return
        set_cookie = self.token is not None and request.query_params.get("token") == self.token

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if set_cookie:
                    headers.append(
                        "set-cookie",
                        f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict",
                    )
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, request: Request) -> str | None:
        if self.token is not None:
            auth = request.headers.get("authorization", "")
            given = (
                request.headers.get(TOKEN_HEADER)
                or (auth[7:] if auth.lower().startswith("bearer ") else None)
                or request.query_params.get("token")
                or request.cookies.get(TOKEN_COOKIE)
            )
            if not given or not secrets.compare_digest(given, self.token):
                return (
                    "a token is required: open the URL slider-cn ui printed (it ends in ?token=...)"
                )
        else:
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            name = name.strip("[]").lower()
            if name not in self.allowed_hosts:
                return f"host {host!r} is not this server's (loopback only without a token)"
        if request.method not in ("GET", "HEAD", "OPTIONS") and WRITE_HEADER not in request.headers:
            return (
                f"requests that change something need the {WRITE_HEADER} header (the UI sends it)"
            )
        return None


# --- request bodies --------------------------------------------------------------------------


class ConfigBody(BaseModel):
    path: str = "config.json"
    values: dict[str, Any] = Field(default_factory=dict)


class TargetsBody(ConfigBody):
    side: str | None = Field(None, pattern="^(denoiser|controlnet)$")


class PlanBody(ConfigBody):
    count: int = Field(12, ge=1, le=500)


class DataloaderBody(BaseModel):
    path: str
    backends: list[Any]


class StartBody(BaseModel):
    path: str = "config.json"
    resume: bool = False


class ExportBody(BaseModel):
    adapter: str
    format: str = Field(pattern="^(kohya|diffusers|merged-controlnet)$")
    strength: float = 1.0


class PreprocessBody(BaseModel):
    detector: str
    input: str
    output: str
    resolution: int | None = Field(None, ge=8)
    params: dict[str, Any] = Field(default_factory=dict)


# --- helpers ---------------------------------------------------------------------------------


def _write_json_atomically(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".slider-cn-ui-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _new_folders(folder: Path):
    """Make ``folder`` (and missing parents) for a file about to be checked and written; remove
    what was made if the check fails, so a refused save leaves nothing behind."""
    made = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        made.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in made:
            with suppress(OSError):
                path.rmdir()
        raise


def _cli(args: list[str], cwd: Path, timeout: float = 3600) -> dict[str, Any]:
    """Run a slider-cn subcommand as a child process (an argument list) and report it."""
    command = [sys.executable, "-m", "slider_cn.cli", *args]
    try:
        done = subprocess.run(  # noqa: S603 - an argument list, no shell
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "exit_code": None, "stdout": "", "stderr": f"timed out ({timeout} s)"}
    return {
        "ok": done.returncode == 0,
        "exit_code": done.returncode,
        "command": command[1:],
        "stdout": done.stdout[-8000:],
        "stderr": "\n".join(tail_lines(done.stderr)),
    }


def create_app(
    workspace: str | Path,
    *,
    token: str | None = None,
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    default_config: str = "config.json",
    runner: JobRunner | None = None,
) -> FastAPI:
    """The UI's app over ``workspace``. ``token``: required on every request when set."""
    ws = Workspace(workspace)
    runner = runner or JobRunner(ws)
    closing = asyncio.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        closing.set()
        await asyncio.to_thread(runner.shutdown)

    app = FastAPI(title="slider-cn", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.workspace = ws
    app.state.runner = runner
    app.add_middleware(Guard, token=token, allowed_hosts=tuple(allowed_hosts))
    static = resources.files("slider_cn.ui") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.exception_handler(PathRefused)
    @app.exception_handler(PathMissing)
    @app.exception_handler(JobRefused)
    async def _refused(request: Request, exc: Exception):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(CheckFailed)
    async def _check_failed(request: Request, exc: CheckFailed):
        problems = exc.problems.to_json()
        return JSONResponse(
            {"detail": problems["message"], "problems": problems}, status_code=exc.status
        )

    def load_values(rel: str) -> dict[str, Any]:
        path = ws.resolve(rel, must_exist=True)
        try:
            raw = read_json(path)
        except ConfigError as exc:
            raise CheckFailed(Problems(general=[str(exc).replace(str(path), rel)])) from None
        if not isinstance(raw, dict):
            raise CheckFailed(Problems(general=[f"{rel}: the config must be a JSON object"]))
        return raw

    def confined_config(body: ConfigBody):
        config = checks.check_config(ws, body.path, body.values)
        checks.confine_config(ws, config, body.path)
        return config

    # --- the page --------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(str(static / "index.html"), headers={"cache-control": "no-store"})

    @app.get("/api/info")
    def info():
        return {
            "workspace": str(ws.root),
            "default_config": default_config,
            "token_required": token is not None,
            "max_upload_bytes": max_upload_bytes,
        }

    @app.get("/api/schema")
    def schema():
        from slider_cn.ui.schema import form_schema

        return form_schema()

    # --- files -----------------------------------------------------------------------------

    @app.get("/api/files")
    def files(path: str = ""):
        return {"path": ws.relative(ws.resolve(path)), "entries": ws.listing(path)}

    @app.get("/api/folders")
    def folders():
        return {"folders": ws.folders()}

    @app.get("/api/file")
    def file(path: str):
        target = ws.resolve(path, must_exist=True)
        if not target.is_file():
            raise PathMissing(f"not a file: {path}")
        # a workspace file is data, never a page of this origin: no scripts, its own origin
        return FileResponse(str(target), headers={"content-security-policy": "sandbox"})

    @app.get("/api/thumb")
    def thumb(path: str, size: int = Query(160, ge=16, le=1024)):
        from PIL import Image

        target = ws.resolve(path, must_exist=True)
        if not target.is_file():
            raise PathMissing(f"not a file: {path}")
        try:
            with Image.open(target) as image:
                image = image.convert("RGB")
                scale = size / max(image.size)
                new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                # small images are enlarged pixel for pixel, as the sweep grids are
                resample = Image.NEAREST if scale > 1 else Image.LANCZOS
                image = image.resize(new, resample)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise PathMissing(f"not a readable image: {path} ({exc})") from None
        return Response(buffer.getvalue(), media_type="image/png")

    @app.put("/api/upload")
    async def upload(request: Request, path: str):
        target = ws.resolve(path)
        if target.is_dir():
            raise PathRefused(f"{path} is a folder; name the file to write")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload_bytes:
            return JSONResponse(
                {"detail": f"upload too large: {length} bytes (limit {max_upload_bytes})"},
                status_code=413,
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".slider-cn-ui-", dir=target.parent)
        written = 0
        try:
            with os.fdopen(handle, "wb") as out:
                async for chunk in request.stream():
                    written += len(chunk)
                    if written > max_upload_bytes:
                        raise ValueError
                    out.write(chunk)
            os.replace(tmp, target)
        except ValueError:
            Path(tmp).unlink(missing_ok=True)
            return JSONResponse(
                {"detail": f"upload too large: over {max_upload_bytes} bytes"}, status_code=413
            )
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return {"path": ws.relative(target), "size": written}

    # --- config and dataloader ---------------------------------------------------------------

    @app.get("/api/config")
    def get_config(path: str = "config.json"):
        values = load_values(path)
        try:
            checks.check_config(ws, path, values)
            problems = Problems()
        except CheckFailed as exc:
            problems = exc.problems
        return {"path": path, "values": values, "problems": problems.to_json()}

    @app.post("/api/config/check")
    def check_config(body: ConfigBody):
        config = checks.check_config(ws, body.path, body.values)
        return {"ok": True, "resolved": config.model_dump()}

    @app.put("/api/config")
    def save_config(body: ConfigBody):
        target = ws.resolve(body.path)
        with _new_folders(target.parent):
            config = checks.check_config(ws, body.path, body.values)
        _write_json_atomically(target, body.values)
        return {"path": ws.relative(target), "resolved": config.model_dump()}

    @app.get("/api/dataloader")
    def get_dataloader(path: str):
        target = ws.resolve(path, must_exist=True)
        try:
            backends = read_json(target, what="dataloader config")
        except ConfigError as exc:
            raise CheckFailed(Problems(general=[str(exc).replace(str(target), path)])) from None
        if not isinstance(backends, list):
            raise CheckFailed(Problems(general=[f"{path}: the dataloader config must be a list"]))
        return {"path": path, "backends": backends}

    @app.put("/api/dataloader")
    def save_dataloader(body: DataloaderBody):
        target = ws.resolve(body.path)
        with _new_folders(target.parent):
            checks.check_dataloader(ws, body.path, body.backends)
        _write_json_atomically(target, body.backends)
        return {"path": ws.relative(target), "backends": body.backends}

    # --- preview -----------------------------------------------------------------------------

    @app.post("/api/targets")
    def targets(body: TargetsBody):
        return checks.targets(confined_config(body), side=body.side)

    @app.post("/api/plan")
    def plan(body: PlanBody):
        return checks.plan(ws, confined_config(body), body.count)

    # --- the run -----------------------------------------------------------------------------

    @app.get("/api/job")
    def job(since: int = Query(0, ge=0)):
        return runner.snapshot(since)

    @app.post("/api/job/start")
    def start(body: StartBody):
        config_path = ws.resolve(body.path, must_exist=True)
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            raise CheckFailed(
                checks.config_problems(str(exc).replace(str(config_path), body.path))
            ) from None
        checks.confine_config(ws, config, body.path)
        return runner.start(config_path, config, resume=body.resume)

    @app.post("/api/job/stop")
    def stop():
        return runner.stop()

    @app.get("/api/job/events")
    async def events(request: Request):
        """Server-sent events: the run's snapshot whenever it changes (new log records, a new
        state), until the run has ended. A reconnect resumes from the last event's id."""
        last = request.headers.get("last-event-id", "")
        job_id, _, cursor_text = last.partition(":")
        cursor = int(cursor_text) if cursor_text.isdigit() else 0

        async def stream():
            nonlocal cursor
            sent_state = None
            current = runner.job.id if runner.job else None
            if str(current) != job_id:
                cursor = 0  # another run than the one the client followed
            while not closing.is_set():
                snap = await asyncio.to_thread(runner.snapshot, cursor)
                if snap["records"] or snap["state"] != sent_state or snap["id"] != current:
                    current = snap["id"]
                    cursor = snap["cursor"]
                    sent_state = snap["state"]
                    yield f"id: {snap['id']}:{cursor}\ndata: {json.dumps(snap)}\n\n"
                if snap["state"] not in ("running", "stopping"):
                    yield "event: end\ndata: {}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.25)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"cache-control": "no-store"}
        )

    # --- what the run made -------------------------------------------------------------------

    @app.get("/api/outputs")
    def outputs(path: str):
        return run_outputs(ws, ws.resolve(path))

    @app.post("/api/export")
    def export(body: ExportBody):
        adapter = ws.resolve(body.adapter, must_exist=True)
        args = ["export", "--adapter", str(adapter), "--format", body.format]
        args.append(f"--strength={body.strength!r}")
        result = _cli(args, ws.root)
        path = result["stdout"].strip().splitlines()[-1:] if result["ok"] else []
        if path and ws.contains(path[0]):
            result["path"] = ws.relative(path[0])
        return result

    @app.post("/api/preprocess")
    def preprocess(body: PreprocessBody):
        from conditioning.registry import get_spec

        try:
            spec = get_spec(body.detector)
        except ConfigError as exc:
            raise CheckFailed(Problems(general=[str(exc)])) from None
        source = ws.resolve(body.input, must_exist=True)
        output = ws.resolve(body.output)
        args = ["preprocess", "--detector", spec.name, "--input", str(source)]
        args += ["--output", str(output)]
        if body.resolution:
            args.append(f"--resolution={body.resolution}")
        own = {p.name: p for p in spec.params}
        unknown = [name for name in body.params if name not in own]
        if unknown:
            raise CheckFailed(
                Problems(
                    general=[
                        f"{', '.join(unknown)} does not apply to detector '{spec.name}'; its "
                        f"options: {', '.join(own) or 'none'}"
                    ]
                )
            )
        for name, value in body.params.items():
            flag = "--" + name.replace("_", "-")
            if own[name].type is bool:
                args.append(flag if value else "--no-" + flag[2:])
            elif value is not None and value != "":
                args.append(f"{flag}={value}")
        return _cli(args, ws.root)

    return app
