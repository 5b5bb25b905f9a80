"""Run untrusted Python in a contained process, and always clean up after it.

Each run gets its own process in its own session/process group, a fresh temporary
directory as its working directory, a scrubbed environment, resource limits, no
network and no way to start processes (see `training/sandbox_runner.py` for the
layers inside the child). The parent enforces the wall-clock timeout and an output
cap itself: on timeout or too much output it kills the whole process group, then
reaps the child and removes the directory. Nothing is left behind after a run:
no process, no file descriptor, no temp dir (tested with hostile programs).

Network fallback: as root the child enters an empty network namespace
(`unshare(CLONE_NEWNET)`) and drops to `nobody`; without root (or where namespaces
are not allowed) the audit hook refusing socket creation is the barrier.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

RUNNER = Path(__file__).with_name("sandbox_runner.py")
NOBODY = 65534
Status = Literal["ok", "runtime_error", "timeout", "memory", "output_limit"]


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 6.0
    memory_mb: int = 1024
    max_output_bytes: int = 1 << 20
    max_file_bytes: int = 1 << 20
    max_open_files: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s <= 60:
            raise ValueError(f"timeout_s must be in (0, 60], got {self.timeout_s}")
        if self.memory_mb < 64:
            raise ValueError("memory_mb must be >= 64 (the interpreter itself needs ~30 MB)")


@dataclass(frozen=True)
class RunResult:
    status: Status
    stdout: str
    stderr: str
    returncode: int | None
    wall_s: float
    value: Any = None  # a functional call's return value
    isolation: str | None = None  # what the child achieved: netns+nobody, nobody or audit-hook


def _env(workdir: str, limits: SandboxLimits) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
        "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
        "SANDBOX_LIMITS": json.dumps({"memory_mb": limits.memory_mb, "cpu_s": math.ceil(limits.timeout_s) + 1,
                                      "file_bytes": limits.max_file_bytes, "open_files": limits.max_open_files}),
    }


def run_python(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
               call: dict | None = None) -> RunResult:
    """Run `source` with `stdin` (or call `call = {"fn_name", "args"}` in it) under the limits."""
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    read_fd, write_fd = os.pipe()
    try:
        Path(workdir, "solution.py").write_text(source)
        if os.geteuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)  # the child drops to nobody and may write only here
        proc = subprocess.Popen(
            [sys.executable, "-I", str(RUNNER), "functional" if call else "stdin", str(write_fd)],
            cwd=workdir, env=_env(workdir, limits), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, pass_fds=(write_fd,), start_new_session=True, close_fds=True,
        )
        os.close(write_fd)
        write_fd = -1
        payload = json.dumps(call) if call else stdin
        return _supervise(proc, payload.encode(), read_fd, limits)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _supervise(proc: subprocess.Popen, payload: bytes, result_fd: int, limits: SandboxLimits) -> RunResult:
    started = time.monotonic()
    deadline = started + limits.timeout_s
    out, err, result = bytearray(), bytearray(), bytearray()
    status: Status | None = None
    with selectors.DefaultSelector() as sel:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        sel.register(result_fd, selectors.EVENT_READ, result)
        sent = 0
        if not payload:
            sel.unregister(proc.stdin)
            proc.stdin.close()
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status = "timeout"
                break
            for key, _ in sel.select(timeout=remaining):
                if key.fileobj is proc.stdin:
                    try:
                        sent += os.write(proc.stdin.fileno(), payload[sent:sent + 65536])
                    except BrokenPipeError:
                        sent = len(payload)
                    if sent >= len(payload):
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
            if len(out) + len(err) > limits.max_output_bytes:
                status = "output_limit"
                break
    _kill_group(proc)  # whatever it left running (nothing, unless a layer failed)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream and not stream.closed:
            stream.close()
    returncode = proc.wait()
    wall = time.monotonic() - started
    stderr = err.decode(errors="replace")
    if status is None:
        if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            status = "timeout"
        elif "MemoryError" in stderr:
            status = "memory"
        elif returncode != 0:
            status = "runtime_error"
        else:
            status = "ok"
    report = json.loads(result) if status == "ok" and result else {}
    if status == "ok" and not report:
        status = "runtime_error"  # exited 0 without the runner's report (e.g. os._exit in the program)
    return RunResult(status, out.decode(errors="replace"), stderr, returncode, wall,
                     report.get("result"), report.get("isolation"))
