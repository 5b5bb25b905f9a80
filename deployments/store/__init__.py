"""Durable state of the video service: the job store (SQLite / PostgreSQL) and the blob store (fsspec)."""
