"""The training run the UI starts: `slider-cn train` as a child process, one per workspace.

The child is started from an argument list (never a shell string) in its own session, with its
stdout and stderr in a log file under the workspace's `.slider-cn-ui/jobs/`. Progress is read
from the run's own `train_log.jsonl` (one JSON line per micro-batch), stamped with the time it
was seen, so the page gets step, loss, sign, it/s and ETA without the child knowing about the UI.

Stop is Ctrl-C: SIGINT to the child, which finishes the optimizer step it is in, writes a
checkpoint and exits 130. Resume starts the same config again with
`--resume_from_checkpoint latest`. A child that exits otherwise is a failed run, reported with
the last lines of its log; the server is not affected.

One run at a time per workspace: the runner holds an exclusive lock on
`.slider-cn-ui/run.lock` and hands the locked file to the child, so the lock lasts as long as the
run, even past the server that started it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slider_cn.config import TrainConfig
from slider_cn.ui.workspace import Workspace

try:  # POSIX: the run lock; elsewhere the in-process check is all there is
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger("slider_cn.ui")

TAIL_LINES = 40
_PROGRESS_BAR = re.compile(r"\d+%\|")
RUNNING_STATES = ("running", "stopping")


class JobRefused(Exception):
    """A run cannot start or stop now (one is running, none to stop, nothing to resume)."""

    status = 409


@dataclass
class Job:
    id: int
    config: str  # the config file, relative to the workspace
    output_dir: Path
    args: list[str]
    log_path: Path
    resume: bool
    max_steps: int | None
    started: float = field(default_factory=time.time)
    proc: subprocess.Popen | None = None
    state: str = "running"
    exit_code: int | None = None
    ended: float | None = None
    stop_requested: bool = False
    # train_log.jsonl as read so far: compact records, each with the time it was first seen
    records: list[dict[str, Any]] = field(default_factory=list)
    offset: int = 0
    first_new: int = 0  # records before this index were written by earlier runs


def expected_steps(config: TrainConfig) -> int | None:
    """The optimizer steps the run will make (as the recipe counts them), or None if the data
    cannot be read here (the run will then say why)."""
    if config.max_train_steps:
        return config.max_train_steps
    try:
        from slider_cn.data.backends import build_backends
        from slider_cn.data.sampler import SliderSampler

        sampler = SliderSampler(build_backends(config), config.train_batch_size, config.seed)
    except Exception:  # noqa: BLE001 - only an estimate for the progress bar
        return None
    micro = max(1, len(sampler))
    return max(1, config.num_train_epochs * micro // config.gradient_accumulation_steps)


def log_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last lines of a child's log; runs of progress-bar redraws count as one line."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return tail_lines(text, lines)


def tail_lines(text: str, lines: int = TAIL_LINES) -> list[str]:
    """The last non-empty lines of a child's output, progress-bar redraws folded into one."""
    out: list[str] = []
    for line in re.split(r"[\r\n]+", text):
        line = line.rstrip()
        if not line:
            continue
        if out and _PROGRESS_BAR.search(line) and _PROGRESS_BAR.search(out[-1]):
            out[-1] = line
        else:
            out.append(line)
    return out[-lines:]


def checkpoints_in(output_dir: Path) -> list[str]:
    def step(path: Path) -> int:
        tail = path.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and step(p) >= 0]
    return [p.name for p in sorted(found, key=step)]


class JobRunner:
    def __init__(self, ws: Workspace, python: str = sys.executable, poll: float = 0.3):
        self.ws = ws
        self.python = python
        self.poll = poll
        self.job: Job | None = None
        self._lock = threading.RLock()
        self._count = 0
        self._lock_fd: int | None = None

    # --- start / stop ----------------------------------------------------------------------

    def start(self, config_path: Path, config: TrainConfig, *, resume: bool = False) -> dict:
        max_steps = expected_steps(config)  # may scan the dataset: outside the lock
        with self._lock:
            if self.job is not None and self.job.state in RUNNING_STATES:
                raise JobRefused(
                    f"a run is already going in this workspace ({self.job.config}, pid "
                    f"{self.job.proc.pid if self.job.proc else '?'}): one at a time; stop it first"
                )
            output_dir = Path(config.output_dir)
            if resume and not checkpoints_in(output_dir):
                raise JobRefused(
                    f"nothing to resume: no checkpoint in {self.ws.relative(output_dir)}"
                )
            lock_fd = self._take_run_lock()
            self._count += 1
            args = [self.python, "-m", "slider_cn.cli", "train", "--config", str(config_path)]
            if resume:
                args += ["--resume_from_checkpoint", "latest"]
            jobs = self.ws.state_dir / "jobs"
            jobs.mkdir(exist_ok=True)
            log_path = jobs / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{self._count}.log"
            job = Job(
                id=self._count,
                config=self.ws.relative(config_path),
                output_dir=output_dir,
                args=args,
                log_path=log_path,
                resume=resume,
                max_steps=max_steps,
            )
            self._read_progress(job)  # an earlier run's records (resume): the curve goes on
            job.first_new = len(job.records)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            try:
                with open(log_path, "wb") as out:
                    job.proc = subprocess.Popen(  # noqa: S603 - an argument list, no shell
                        args,
                        cwd=self.ws.root,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                        pass_fds=(lock_fd,) if lock_fd is not None else (),
                        start_new_session=True,
                    )
            except OSError:
                self._release_run_lock()
                raise
            if lock_fd is not None:
                os.ftruncate(lock_fd, 0)
                os.pwrite(lock_fd, f"{job.proc.pid}\n".encode(), 0)
            self.job = job
            log.info("run %d started: %s (pid %d)", job.id, " ".join(args), job.proc.pid)
            threading.Thread(target=self._watch, args=(job,), daemon=True).start()
            return self.snapshot()

    def stop(self) -> dict:
        """Ctrl-C for the child: a checkpoint at the end of this step, then exit. A second stop
        stops at once (the checkpoint is that of the last finished step)."""
        with self._lock:
            job = self.job
            if job is None or job.state not in RUNNING_STATES or job.proc is None:
                raise JobRefused("no run is going")
            job.stop_requested = True
            job.state = "stopping"
            try:
                job.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
            return self.snapshot()

    def shutdown(self, timeout: float = 120.0) -> None:
        """The server is going: stop a running child as Ctrl-C would and wait for it."""
        job = self.job
        if job is None or job.proc is None or job.state not in RUNNING_STATES:
            return
        if not job.stop_requested:
            self.stop()
        try:
            job.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "run %d (pid %d) still saving after %.0f s; left running",
                job.id,
                job.proc.pid,
                timeout,
            )

    # --- watching ----------------------------------------------------------------------------

    def _watch(self, job: Job) -> None:
        assert job.proc is not None
        while job.proc.poll() is None:
            with self._lock:
                self._read_progress(job)
            time.sleep(self.poll)
        code = job.proc.returncode
        with self._lock:
            self._read_progress(job)
            job.exit_code = code
            job.ended = time.time()
            if code == 0:
                job.state = "finished"
            elif code in (130, -signal.SIGINT):
                job.state = "stopped"
            else:
                job.state = "failed"
            self._release_run_lock()
        log.info("run %d %s (exit code %s)", job.id, job.state, code)

    def _read_progress(self, job: Job) -> None:
        """New complete lines of train_log.jsonl, each stamped with the time it was seen."""
        path = job.output_dir / "train_log.jsonl"
        try:
            size = path.stat().st_size
        except OSError:
            return
        if size < job.offset:  # the log was replaced: start over
            job.offset, job.records, job.first_new = 0, [], 0
        if size == job.offset:
            return
        with open(path, "rb") as handle:
            handle.seek(job.offset)
            chunk = handle.read(size - job.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        now = time.time()
        for line in chunk[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            job.records.append(
                {
                    "step": record.get("step"),
                    "loss": record.get("loss"),
                    "sign": record.get("sign"),
                    "backend": record.get("backend"),
                    "strength": record.get("strength"),
                    "t": now,
                }
            )
        job.offset += end + 1

    # --- what the page sees ----------------------------------------------------------------

    def snapshot(self, since: int = 0) -> dict[str, Any]:
        with self._lock:
            job = self.job
            if job is None:
                return {"id": None, "state": "idle", "records": [], "cursor": 0}
            self._read_progress(job)
            last = job.records[-1] if job.records else {}
            step = last.get("step") or 0
            rate = _rate(job.records[job.first_new :])
            remaining = (job.max_steps - step) if job.max_steps else None
            checkpoints = checkpoints_in(job.output_dir)
            data = {
                "id": job.id,
                "state": job.state,
                "config": job.config,
                "output_dir": self.ws.relative(job.output_dir)
                if self.ws.contains(job.output_dir)
                else str(job.output_dir),
                "resume": job.resume,
                "command": job.args[1:],
                "pid": job.proc.pid if job.proc else None,
                "started": job.started,
                "ended": job.ended,
                "exit_code": job.exit_code,
                "max_steps": job.max_steps,
                "step": step,
                "loss": last.get("loss"),
                "sign": last.get("sign"),
                "backend": last.get("backend"),
                "it_s": rate,
                "eta_s": remaining / rate if rate and remaining is not None else None,
                "checkpoints": checkpoints,
                "records": [
                    {k: r[k] for k in ("step", "loss", "sign", "backend")}
                    for r in job.records[since:]
                ],
                "cursor": len(job.records),
                "log": self.ws.relative(job.log_path),
            }
            data["log_tail"] = log_tail(job.log_path, TAIL_LINES if job.state == "failed" else 8)
            data["message"] = _message(data)
            return data

    # --- the run lock ----------------------------------------------------------------------

    def _take_run_lock(self) -> int | None:
        if fcntl is None:
            return None
        path = self.ws.state_dir / "run.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise JobRefused(
                f"another run in this workspace is still going (pid {holder}, started by another "
                "server): one at a time; wait for it or stop it"
            ) from None
        self._lock_fd = fd
        return fd

    def _release_run_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _rate(records: list[dict[str, Any]], window: int = 30) -> float | None:
    """Optimizer steps per second over the last ``window`` steps this run made."""
    firsts: dict[int, float] = {}
    for record in records:
        step = record.get("step")
        if isinstance(step, int) and step not in firsts:
            firsts[step] = record["t"]
    steps = sorted(firsts)[-window:]
    if len(steps) < 2 or firsts[steps[-1]] <= firsts[steps[0]]:
        return None
    return (steps[-1] - steps[0]) / (firsts[steps[-1]] - firsts[steps[0]])


def _message(snap: dict[str, Any]) -> str:
    state, step, total = snap["state"], snap["step"], snap["max_steps"]
    of = f" of {total}" if total else ""
    if state == "running":
        return f"training: step {step}{of}" if step else "starting: loading data and models"
    if state == "stopping":
        return "stopping: a checkpoint at the end of this step, then exit"
    if state == "finished":
        return f"finished: {step} steps; the slider is in {snap['output_dir']}"
    if state == "stopped":
        if snap["checkpoints"]:
            return (
                f"stopped at step {step}; {snap['checkpoints'][-1]} saved: Resume continues from it"
            )
        return "stopped before the first step: nothing was trained, nothing to resume"
    return f"training failed (exit code {snap['exit_code']}); the last lines of its log are below"
