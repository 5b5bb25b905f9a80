"""Runs inside the sandbox process, before and around the untrusted program.

Started by `training.sandbox` as `python -I sandbox_runner.py MODE RESULT_FD` in a
fresh temp directory with a scrubbed environment. In order, it:
1. applies resource limits (address space, CPU time, file size, open files, core);
2. when root: moves itself into a new, empty network namespace and drops to the
   `nobody` user (then RLIMIT_NPROC bites and nothing outside the temp dir is
   writable); not root: the audit hook below is the network/process barrier;
3. installs an audit hook (PEP 578; it cannot be removed) that refuses process
   creation and signals, sockets, ctypes, writes outside the temp dir and reads of
   /proc (other processes' environments);
4. runs the program: `stdin` mode executes it as __main__ with the test input on
   stdin; `functional` mode reads {"fn_name", "args"} from stdin, calls the function
   (or `Solution().fn_name`) and writes {"result": ...} to RESULT_FD.
Only the standard library is used, and everything is imported before step 3.
The modules that solutions commonly use are imported before step 2 as well: once
the child is `nobody` it may not be able to read the interpreter's library
directory (e.g. a Python installed under /root).
"""

import array  # noqa: F401  (prelude for solutions, see above)
import bisect  # noqa: F401
import collections  # noqa: F401
import copy  # noqa: F401
import ctypes
import dataclasses  # noqa: F401
import datetime  # noqa: F401
import decimal  # noqa: F401
import fractions  # noqa: F401
import functools  # noqa: F401
import heapq  # noqa: F401
import io  # noqa: F401
import itertools  # noqa: F401
import json
import math  # noqa: F401
import operator  # noqa: F401
import os
import random  # noqa: F401
import re  # noqa: F401
import resource
import statistics  # noqa: F401
import string  # noqa: F401
import sys
import typing  # noqa: F401

CLONE_NEWNET = 0x40000000
NOBODY = 65534
BLOCKED_EVENTS = {
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
    "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.sendto",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "os.setuid", "os.setgid", "resource.setrlimit", "resource.prlimit",
}
BLOCKED_IMPORTS = {"_posixsubprocess", "_ctypes", "ctypes", "multiprocessing", "_multiprocessing"}
WRITE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
                "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}


def _limit(memory_mb: int, cpu_s: int, file_bytes: int, open_files: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _isolate() -> str:
    """New network namespace and the nobody user when root; returns what was achieved."""
    if os.geteuid() != 0:
        return "audit-hook"
    libc = ctypes.CDLL(None, use_errno=True)
    netns = libc.unshare(CLONE_NEWNET) == 0
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    return "netns+nobody" if netns else "nobody"


def _forget_ctypes() -> None:
    """Drop the runner's own ctypes so that the program's `import ctypes` meets the import hook."""
    for name in [n for n in sys.modules if n == "ctypes" or n.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


def _install_hook(workdir: str) -> None:
    root = os.path.realpath(workdir) + os.sep

    def inside(path) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root)
        except (TypeError, ValueError):
            return False

    def hook(event, args):
        if event in BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in BLOCKED_IMPORTS:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writing = (mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & (
                os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)
            text = os.fsdecode(path) if isinstance(path, (str, bytes)) else ""
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {text!r} outside the work directory")
            if text.startswith("/proc"):
                raise PermissionError("sandbox: /proc is not readable")
        if event in WRITE_EVENTS and args and not inside(args[0]):
            raise PermissionError(f"sandbox: {event} outside the work directory")

    sys.addaudithook(hook)


def _call(namespace: dict, spec: dict):
    fn = namespace.get(spec["fn_name"])
    if not callable(fn) and isinstance(namespace.get("Solution"), type):
        fn = getattr(namespace["Solution"](), spec["fn_name"], None)
    if not callable(fn):
        raise NameError(f"no function {spec['fn_name']!r} (top level or Solution method)")
    return fn(*spec["args"])


def main() -> None:
    mode, result_fd = sys.argv[1], int(sys.argv[2])
    limits = json.loads(os.environ.pop("SANDBOX_LIMITS"))
    _limit(**limits)
    isolation = _isolate()
    _forget_ctypes()
    workdir = os.getcwd()
    source = open("solution.py").read()
    spec = json.loads(sys.stdin.read()) if mode == "functional" else None
    result = os.fdopen(result_fd, "w")
    sys.argv = ["solution.py"]
    sys.path.insert(0, workdir)
    _install_hook(workdir)
    code = compile(source, "solution.py", "exec")
    namespace = {"__name__": "__main__" if mode == "stdin" else "solution", "__builtins__": __builtins__}
    exec(code, namespace)
    if spec is not None:
        value = _call(namespace, spec)
        result.write(json.dumps({"result": value, "isolation": isolation}, default=repr))
    else:
        result.write(json.dumps({"isolation": isolation}))
    sys.stdout.flush()
    result.flush()


if __name__ == "__main__":
    main()
