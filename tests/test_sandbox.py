"""Hostile programs in the sandbox: each gets the right verdict, stays in its limits, leaves nothing behind."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from training.problems import Problem, TestCase
from training.reward import RewardConfig, score_response
from training.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(timeout_s=2.0, memory_mb=256, max_output_bytes=1 << 16)


def _runner_processes() -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"sandbox_runner.py" in f.read():
                        found.append(pid)
            except OSError:
                pass
    return found


@pytest.fixture(autouse=True)
def leaves_nothing_behind():
    tmp = tempfile.gettempdir()
    dirs_before = set(glob.glob(os.path.join(tmp, "sandbox-*")))
    yield
    time.sleep(0.05)
    assert set(glob.glob(os.path.join(tmp, "sandbox-*"))) == dirs_before, "temp dir left behind"
    assert _runner_processes() == [], "sandbox process left running"


def test_no_file_descriptor_leaks_across_runs():
    """Counted in a fresh interpreter: pytest's own process has background threads (Ray, gRPC) opening fds."""
    script = (
        "import os\n"
        "from training.sandbox import run_python, SandboxLimits\n"
        "limits = SandboxLimits(timeout_s=1.0, max_output_bytes=1 << 14)\n"
        "run_python('print(1)', '', limits)\n"
        "before = len(os.listdir('/proc/self/fd'))\n"
        "for src in ['print(input())', 'raise SystemExit(3)', 'while True: pass', 'while True: print(1)',\n"
        "            'import os\\nos.fork()']:\n"
        "    run_python(src, 'x', limits)\n"
        "print(before, len(os.listdir('/proc/self/fd')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    before, after = map(int, out.stdout.split())
    assert before == after, out.stderr


def test_correct_program_runs_isolated():
    r = run_python("print(sum(map(int, input().split())))", "3 4 5", LIMITS)
    assert (r.status, r.stdout) == ("ok", "12\n")
    assert r.isolation in {"netns+nobody", "nobody", "audit-hook"}
    if os.geteuid() == 0:
        assert r.isolation.endswith("nobody")


def test_functional_call_returns_the_value():
    r = run_python("class Solution:\n    def twice(self, x):\n        return [x, x]\n", limits=LIMITS,
                   call={"fn_name": "twice", "args": [7]})
    assert (r.status, r.value) == ("ok", [7, 7])


@pytest.mark.parametrize("source, status, needle", [
    ("raise ValueError('boom')", "runtime_error", "boom"),
    ("import os\nwhile True:\n    os.fork()", "runtime_error", "os.fork is not allowed"),
    ("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])", "runtime_error", ""),
    ("x = bytearray(1 << 34)", "memory", "MemoryError"),
    ("open('/tmp/sandbox-escape.txt', 'w').write('x')", "runtime_error", "outside the work directory"),
    ("import os\nos.remove('/etc/hostname')", "runtime_error", "outside the work directory"),
    ("print(open('/proc/1/environ').read())", "runtime_error", "/proc is not readable"),
    ("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 80))", "runtime_error", ""),
    ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "runtime_error", ""),
    ("import ctypes\nctypes.CDLL(None).fork()", "runtime_error", "ctypes is not allowed"),
    ("open('big.bin', 'wb').write(b'x' * (64 << 20))", "runtime_error", ""),
    ("import os\nos._exit(0)", "runtime_error", ""),
])
def test_hostile_program_is_contained(source, status, needle):
    started = time.monotonic()
    r = run_python(source, "", LIMITS)
    assert r.status == status, r.stderr
    assert needle in r.stderr
    assert time.monotonic() - started < LIMITS.timeout_s + 1
    assert not os.path.exists("/tmp/sandbox-escape.txt")


@pytest.mark.parametrize("source", ["while True:\n    pass", "import time\ntime.sleep(100)"])
def test_endless_program_is_killed_at_the_timeout(source):
    r = run_python(source, "", LIMITS)
    assert r.status == "timeout"
    assert LIMITS.timeout_s <= r.wall_s < LIMITS.timeout_s + 1


def test_huge_output_is_cut_off():
    r = run_python("while True:\n    print('x' * 10000)", "", LIMITS)
    assert r.status == "output_limit" and r.wall_s < 1.0


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    r = run_python("import os\nprint(dict(os.environ))", "", LIMITS)
    assert r.status == "ok" and "hunter2" not in r.stdout and "SECRET_TOKEN" not in r.stdout


def test_reward_is_binary_and_needs_every_selected_test():
    # Input length grows with i, so the 15 longest inputs are i = 5..19.
    tests = tuple(TestCase(kind="stdin", input=" " * i + f"{i}\n", output=f"{i * i}\n") for i in range(20))
    problem = Problem(id="sq", source="test", statement="square", tests=tests)
    config = RewardConfig(tests_per_problem=15)
    good = score_response(problem, "Here:\n```python\nn = int(input())\nprint(n * n)\n```", config)
    assert (good.reward, good.reason, len(good.verdicts)) == (1.0, "passed", 15)
    # Wrong only on small inputs, which are not among the 15 longest: still passes.
    picky = "n = int(input())\nprint(n * n if n >= 5 else -1)"
    assert score_response(problem, f"```python\n{picky}\n```", config).reward == 1.0
    # Wrong on the longest input: fails at once, no partial credit.
    wrong = score_response(problem, "```python\nn = int(input())\nprint(n * n if n < 19 else 0)\n```", config)
    assert (wrong.reward, wrong.reason, wrong.verdicts) == (0.0, "wrong_answer", ("wrong_answer",))
    assert score_response(problem, "n = int(input())\nprint(n * n)", config).reason == "format"
    with pytest.raises(ValueError, match=r"\[6, 12\]"):
        RewardConfig(timeout_s=2)
