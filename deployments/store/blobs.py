"""The blob store: finished videos and images as files, under a local directory or any fsspec URL.

The job store keeps a blob's path, never its bytes, so a result survives every process
and any replica can serve it. `root` is a local directory (the default, under the app's
data directory) or an fsspec URL such as `s3://bucket/prefix` (its filesystem package,
e.g. s3fs, installed on the serving nodes).
"""

from __future__ import annotations

import posixpath

from fsspec.core import url_to_fs


def input_image_name(job_id: str) -> str:
    """The blob name of an image-to-video job's input image (written by the ingress, read by the job runner)."""
    return f"{job_id}.input"


class BlobStore:
    def __init__(self, root: str) -> None:
        self.fs, path = url_to_fs(root)
        self.root = path.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    def put(self, name: str, data: bytes) -> str:
        """Write `data` as `name` under the root (atomically where the filesystem allows); returns its path."""
        path = self.path(name)
        partial = path + ".partial"
        with self.fs.open(partial, "wb") as out:
            out.write(data)
        self.fs.mv(partial, path)
        return path

    def path(self, name: str) -> str:
        """Where `put(name, ...)` writes."""
        return posixpath.join(self.root, name)

    def get(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as blob:
            return blob.read()

    def delete(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path)
