"""Binding and running the UI's server (`slider-cn ui`)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from slider_cn.errors import ConfigError
from slider_cn.ui.app import DEFAULT_MAX_UPLOAD, LOOPBACK_HOSTS, create_app, is_loopback, new_token

TOKEN_ENV = "SLIDER_CN_UI_TOKEN"


def choose_token(host: str, token: str | None) -> str | None:
    """The token the server will ask for: the one given (or in $SLIDER_CN_UI_TOKEN), a new one
    for any host other than loopback, else none."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(host):
        token = new_token()
    return token


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port (0: any free one)"
        ) from None
    sock.listen(64)
    sock.set_inheritable(False)
    return sock


def url_of(host: str, port: int, token: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(
    workspace: str | Path = ".",
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    token: str | None = None,
    config: str = "config.json",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
) -> int:
    """Serve the UI over ``workspace`` until Ctrl-C; a running training child is stopped as
    Ctrl-C would (a checkpoint, then exit) before the server goes."""
    import uvicorn

    if not Path(workspace).is_dir():
        raise ConfigError(f"--workspace: folder not found: {workspace}")
    token = choose_token(host, token)
    sock = bind(host, port)
    port = sock.getsockname()[1]
    app = create_app(
        workspace,
        token=token,
        allowed_hosts=(*LOOPBACK_HOSTS, host.lower()),
        max_upload_bytes=max_upload_bytes,
        default_config=config,
    )
    print(f"slider-cn ui: workspace {app.state.workspace.root}", flush=True)
    print(f"slider-cn ui: open {url_of(host, port, token)}", flush=True)
    if token and not is_loopback(host):
        print(
            "slider-cn ui: every request needs the token (it is in the URL above); traffic is "
            "plain HTTP, so use a trusted network or an SSH tunnel",
            file=sys.stderr,
            flush=True,
        )
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on")
    )
    server.run(sockets=[sock])
    return 0
