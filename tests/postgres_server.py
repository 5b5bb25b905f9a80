"""A throwaway PostgreSQL server for the job-store tests: Debian's `postgresql` binaries, a temp data directory,
a loopback port, trust authentication; stopped and deleted afterwards. scripts/test.sh installs the package."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from common.spmd import free_port


def postgres_bin() -> str | None:
    """Directory of initdb / pg_ctl (Debian keeps them out of PATH), or None when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return os.path.dirname(found[-1])
    pg_ctl = shutil.which("pg_ctl")
    return os.path.dirname(pg_ctl) if pg_ctl else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the URL of a fresh database; PostgreSQL refuses to run as root, so root runs it as `postgres`."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (scripts/test.sh installs Debian's postgresql as root)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = tempfile.mkdtemp(prefix="pg-test-")
    data, port = os.path.join(root, "data"), free_port()
    if as_user:
        shutil.chown(root, "postgres")
    try:
        subprocess.run([*as_user, f"{bin_dir}/initdb", "-D", data, "-A", "trust", "-U", "dit", "--no-sync"],
                       check=True, capture_output=True)
        subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", data, "-w", "-l", os.path.join(root, "log"), "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True)
        try:
            yield f"postgresql://dit@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "stop"],
                           capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
