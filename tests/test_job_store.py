"""The job store against SQLite and a real PostgreSQL server, and the blob store on a local directory."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from deployments.store.blobs import BlobStore
from deployments.store.jobs import JobRecord, JobStore, SqliteJobStore, open_job_store
from engine.request import GenerationSpec
from tests.postgres_server import postgres_server

SPEC = GenerationSpec(model="cogvideox-tiny", prompt="a cat", negative_prompt=None, height=32, width=48,
                      num_frames=9, num_inference_steps=6, guidance_scale=1.0, seed=7, fps=8)


@pytest.fixture(scope="module")
def postgres_url():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> JobStore:
    if request.param == "sqlite":
        opened = open_job_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    else:
        url = request.getfixturevalue("postgres_url")
        opened = open_job_store(url)
        opened._execute("DELETE FROM jobs", {})  # one server for the module: each test starts empty
    yield opened
    opened.close()


def _job(i: int, **fields) -> JobRecord:
    return JobRecord(id=f"video_{i:03d}", spec=replace(SPEC, seed=i), resolution="240p", created_at=1000.0 + i,
                     **fields)


def test_a_job_round_trips_with_its_spec(store):
    created = store.create(_job(1))
    assert store.get("video_001") == created and store.get("video_001").spec == replace(SPEC, seed=1)
    assert store.get("nope") is None


def test_stage_seconds_are_stored_and_viewed(store):
    store.create(_job(1))
    stages = {"encode_s": 0.01, "queue_s": 1.5, "denoise_s": 4.0, "decode_queue_s": 0.0, "decode_s": 2.0, "mux_s": 0.1}
    done = store.update("video_001", status="completed", completed_at=1010.0, stages=stages)
    assert done.stages == stages and store.get("video_001").view().stages == stages
    assert store.get("video_001").to_row()["stages"].startswith("{")


def test_a_store_from_before_stage_times_gains_the_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:  # the table as the first release created it: no `stages`
        old.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, idempotency_key TEXT, spec TEXT NOT "
                    "NULL, resolution TEXT NOT NULL, status TEXT NOT NULL, step INTEGER NOT NULL, created_at DOUBLE "
                    "PRECISION NOT NULL, started_at DOUBLE PRECISION, completed_at DOUBLE PRECISION, error TEXT, "
                    "blob TEXT, restarts INTEGER NOT NULL, UNIQUE (owner, idempotency_key))")
        old.execute("INSERT INTO jobs VALUES ('video_old', '', NULL, ?, '240p', 'queued', 0, 1.0, NULL, NULL, NULL, "
                    "NULL, 0)", (_job(0).to_row()["spec"],))
    reopened = SqliteJobStore(path)
    assert reopened.get("video_old").stages is None
    assert reopened.update("video_old", status="completed", stages={"decode_s": 1.0}).stages == {"decode_s": 1.0}
    reopened.close()


def test_updates_stop_at_the_first_terminal_status(store):
    store.create(_job(1))
    assert store.update("video_001", status="running", step=3, started_at=1001.0).step == 3
    assert store.update("video_001", status="cancelled", completed_at=1002.0).status == "cancelled"
    late = store.update("video_001", status="completed", blob="/x.mp4")  # the runner finished after the cancel
    assert late.status == "cancelled" and late.blob is None


def test_idempotency_key_returns_the_first_job_for_its_owner(store):
    first = store.create(_job(1, idempotency_key="k1"))
    again = store.create(_job(2, idempotency_key="k1"))
    assert again.id == first.id and store.get("video_002") is None
    other_owner = store.create(_job(3, idempotency_key="k1", owner="alice"))
    assert other_owner.id == "video_003"
    assert store.find_by_key("", "k1").id == "video_001"


def test_concurrent_creates_with_one_key_make_one_job(store, tmp_path):
    results = []

    def create(i: int) -> None:
        results.append(store.create(_job(i, idempotency_key="same")).id)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(store.list("", 100)) == 1


def test_list_pages_newest_first(store):
    for i in range(7):
        store.create(_job(i))
    first = store.list("", 3)
    second = store.list("", 3, after=first[-1].id)
    third = store.list("", 3, after=second[-1].id)
    assert [j.id for j in first + second + third] == [f"video_{i:03d}" for i in range(6, -1, -1)]
    assert store.list("someone-else", 10) == []


def test_unfinished_counted_and_expired_swept(store):
    for i in range(4):
        store.create(_job(i))
    store.update("video_000", status="completed", completed_at=100.0, blob="/a")
    store.update("video_001", status="failed", completed_at=5000.0, error="boom")
    store.update("video_002", status="running", started_at=1003.0)
    assert store.count_unfinished() == 2 and [j.id for j in store.unfinished()] == ["video_002", "video_003"]
    expired = store.expired(before=1000.0)
    assert [j.id for j in expired] == ["video_000"]
    store.delete([j.id for j in expired])
    assert store.get("video_000") is None and store.get("video_001") is not None


def test_sqlite_store_is_shared_by_two_connections(tmp_path):
    """Two replicas on one node open the same file (WAL): what one writes the other reads."""
    a, b = SqliteJobStore(tmp_path / "jobs.db"), SqliteJobStore(tmp_path / "jobs.db")
    a.create(_job(1))
    b.update("video_001", status="running", step=2)
    assert a.get("video_001").step == 2
    assert next(a._rows("PRAGMA journal_mode", {}))["journal_mode"] == "wal"


def test_bad_store_url_names_the_choices():
    with pytest.raises(ValueError, match="sqlite:///PATH or postgresql://"):
        open_job_store("mysql://x")


def test_blob_store_put_get_delete(tmp_path):
    blobs = BlobStore(str(tmp_path / "blobs"))
    path = blobs.put("video_1.mp4", b"\x00mp4 bytes")
    assert blobs.get(path) == b"\x00mp4 bytes" and not list((tmp_path / "blobs").glob("*.partial"))
    blobs.delete(path)
    assert not (tmp_path / "blobs" / "video_1.mp4").exists()
    with pytest.raises(FileNotFoundError):
        blobs.get(path)
