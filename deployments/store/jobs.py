"""The job store: every video job's spec, state and result path, in a database instead of a process.

One small interface (`JobStore`) with two backends that share the SQL:
- SQLite (default; a file under the app's data directory, WAL mode so the ingress
  replicas and the job runner read and write it at once);
- PostgreSQL for clusters (psycopg 3), `postgresql://...`.
A job's bytes are never here: the blob store keeps them and the job keeps their path.
Whoever holds a job's id can read it from any replica; the job runner drives jobs from
the store and, on start, re-admits the unfinished ones (same spec, same seed, same bytes).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from api.schemas import JobStatus, Progress, VideoJob
from engine.request import GenerationSpec

TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    idempotency_key TEXT,
    spec TEXT NOT NULL,
    resolution TEXT NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    completed_at DOUBLE PRECISION,
    error TEXT,
    blob TEXT,
    restarts INTEGER NOT NULL,
    stages TEXT,
    computed_steps INTEGER,
    UNIQUE (owner, idempotency_key)
)
"""
_ADDED_COLUMNS = {"stages": "TEXT", "computed_steps": "INTEGER"}
"""Columns added after the first release: stores created before get them on open."""
_INDEXES = ("CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at, id)",
            "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, completed_at)")


@dataclass(frozen=True)
class JobRecord:
    """A row of the store. `owner` is the API key's name ('' without keys); `blob` the result's path."""

    id: str
    spec: GenerationSpec
    resolution: str
    owner: str = ""
    idempotency_key: str | None = None
    status: JobStatus = "queued"
    step: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    error: str | None = None
    blob: str | None = None
    restarts: int = 0
    stages: dict[str, float] | None = None  # completed jobs: seconds per stage (deployments.pipeline.StageTimes)
    computed_steps: int | None = None  # completed jobs: denoising steps that ran the transformer

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def view(self) -> VideoJob:
        r = self.spec
        return VideoJob(
            id=self.id, status=self.status, progress=Progress(step=self.step, total_steps=r.num_inference_steps),
            model=r.model, prompt=r.prompt, resolution=self.resolution, width=r.width, height=r.height,
            num_frames=r.num_frames, fps=r.fps, seed=r.seed, created_at=self.created_at, started_at=self.started_at,
            completed_at=self.completed_at, error=self.error, restarts=self.restarts, stages=self.stages,
            computed_steps=self.computed_steps)

    def to_row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        row["spec"] = json.dumps(self.spec.to_json())
        row["stages"] = _stages_column(self.stages)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "JobRecord":
        stages = json.loads(row["stages"]) if row.get("stages") else None
        return cls(**{**row, "spec": GenerationSpec.from_json(json.loads(row["spec"])), "stages": stages})


def _stages_column(stages: dict[str, float] | None) -> str | None:
    return None if stages is None else json.dumps(stages)


class JobStore(ABC):
    """Transactions are per call; a terminal job is never changed again (the first verdict stands)."""

    def create(self, record: JobRecord) -> JobRecord:
        """Insert `record`, or return the job this owner already created with the same idempotency key."""
        if record.idempotency_key is not None:
            existing = self.find_by_key(record.owner, record.idempotency_key)
            if existing is not None:
                return existing
        row = record.to_row()
        try:
            self._execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})", row)
        except self._integrity_errors:  # the same key raced in from another replica: theirs stands
            existing = self.find_by_key(record.owner, record.idempotency_key) if record.idempotency_key else None
            if existing is None:
                raise
            return existing
        return record

    def find_by_key(self, owner: str, idempotency_key: str) -> JobRecord | None:
        return self._one("SELECT * FROM jobs WHERE owner = :owner AND idempotency_key = :key",
                         {"owner": owner, "key": idempotency_key})

    def get(self, job_id: str) -> JobRecord | None:
        return self._one("SELECT * FROM jobs WHERE id = :id", {"id": job_id})

    def update(self, job_id: str, **changes: Any) -> JobRecord | None:
        """Apply `changes` unless the job is already terminal; returns the job as stored afterwards."""
        if "stages" in changes:
            changes["stages"] = _stages_column(changes["stages"])
        if changes:
            sets = ", ".join(f"{k} = :{k}" for k in changes)
            self._execute(f"UPDATE jobs SET {sets} WHERE id = :id AND status NOT IN "
                          "('completed', 'failed', 'cancelled')", {**changes, "id": job_id})
        return self.get(job_id)

    def list(self, owner: str, limit: int, after: str | None = None) -> list[JobRecord]:
        """The owner's jobs, newest first; `after` is the id of the last job of the previous page."""
        if after is None:
            return self._many("SELECT * FROM jobs WHERE owner = :owner ORDER BY created_at DESC, id DESC "
                              "LIMIT :limit", {"owner": owner, "limit": limit})
        return self._many(
            "SELECT j.* FROM jobs j, jobs a WHERE a.id = :after AND j.owner = :owner AND "
            "(j.created_at < a.created_at OR (j.created_at = a.created_at AND j.id < a.id)) "
            "ORDER BY j.created_at DESC, j.id DESC LIMIT :limit", {"owner": owner, "after": after, "limit": limit})

    def unfinished(self) -> list[JobRecord]:
        return self._many("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY created_at", {})

    def count_unfinished(self) -> int:
        [row] = self._rows("SELECT COUNT(*) AS n FROM jobs WHERE status IN ('queued', 'running')", {})
        return int(row["n"])

    def expired(self, before: float) -> list[JobRecord]:
        """Terminal jobs that ended before `before` (the retention sweep deletes them and their files)."""
        return self._many("SELECT * FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') AND "
                          "completed_at < :before", {"before": before})

    def delete(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self._execute("DELETE FROM jobs WHERE id = :id", {"id": job_id})

    # ---- backend ---------------------------------------------------------------
    _integrity_errors: tuple[type[Exception], ...] = ()

    @abstractmethod
    def _rows(self, sql: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Run one statement in its own transaction; yield the rows as dicts."""

    def _execute(self, sql: str, params: dict[str, Any]) -> None:
        for _ in self._rows(sql, params):
            pass

    def _one(self, sql: str, params: dict[str, Any]) -> JobRecord | None:
        rows = self._many(sql, params)
        return rows[0] if rows else None

    def _many(self, sql: str, params: dict[str, Any]) -> list[JobRecord]:
        return [JobRecord.from_row(r) for r in self._rows(sql, params)]

    def close(self) -> None:
        """Release the connection (tests, shutdown)."""


class SqliteJobStore(JobStore):
    _integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection per store, used under a lock (the replica's event loop and its worker threads).
        self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        for statement in (_SCHEMA, *_INDEXES):
            self._conn.execute(statement)
        present = {row["name"] for row in self._conn.execute("PRAGMA table_info(jobs)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in present:
                self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def _rows(self, sql: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._lock:
            cursor = self._conn.execute(sql, params)
            rows = [dict(r) for r in cursor.fetchall()]
        yield from rows

    def close(self) -> None:
        self._conn.close()


class PostgresJobStore(JobStore):
    def __init__(self, dsn: str) -> None:
        import psycopg
        from psycopg.rows import dict_row

        self._integrity_errors = (psycopg.errors.UniqueViolation,)
        self._conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
        self._lock = threading.Lock()
        with self._lock:
            for statement in (_SCHEMA, *_INDEXES):
                self._conn.execute(statement)
            for column, kind in _ADDED_COLUMNS.items():
                self._conn.execute(f"ALTER TABLE jobs ADD COLUMN IF NOT EXISTS {column} {kind}")

    def _rows(self, sql: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._lock:
            cursor = self._conn.execute(re.sub(r":(\w+)", r"%(\1)s", sql), params)
            rows = list(cursor.fetchall()) if cursor.description is not None else []
        yield from rows

    def close(self) -> None:
        self._conn.close()


def open_job_store(url: str) -> JobStore:
    """`sqlite:///relative/or/absolute/path.db` or `postgresql://user@host:port/db`."""
    if url.startswith("sqlite:///"):
        return SqliteJobStore(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresJobStore(url)
    raise ValueError(f"job store URL {url!r}: expected sqlite:///PATH or postgresql://...")
