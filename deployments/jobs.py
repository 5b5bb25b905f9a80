"""The ingress's job table: one entry per video request, bounded in memory."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from engine.request import GenerationSpec
from serve_graph.schemas import JobStatus, Progress, VideoJob

TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


@dataclass
class Job:
    id: str
    request: GenerationSpec
    resolution: str
    status: JobStatus = "queued"
    step: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    error: str | None = None
    content: bytes | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def observe_progress(self, steps_done: int, first_step_time: float | None) -> None:
        """Record the scheduler's progress; a job with one step run is running."""
        if self.done:
            return
        self.step = steps_done
        if first_step_time is not None:
            self.status, self.started_at = "running", first_step_time

    def finish(self, status: JobStatus, error: str | None = None, content: bytes | None = None) -> None:
        if self.done:  # e.g. cancelled while the VAE was decoding: the first verdict stands
            return
        self.status, self.error, self.content = status, error, content
        self.completed_at = time.time()
        if status == "completed":
            self.step = self.request.num_inference_steps

    def view(self) -> VideoJob:
        r = self.request
        return VideoJob(
            id=self.id, status=self.status, progress=Progress(step=self.step, total_steps=r.num_inference_steps),
            model=r.model, prompt=r.prompt, resolution=self.resolution, width=r.width, height=r.height,
            num_frames=r.num_frames, fps=r.fps, seed=r.seed, created_at=self.created_at, started_at=self.started_at,
            completed_at=self.completed_at, error=self.error,
        )


class JobTable:
    """Insertion-ordered; when over `max_retained`, the oldest finished jobs are dropped."""

    def __init__(self, max_retained: int) -> None:
        self.max_retained = max_retained
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job
        if len(self._jobs) > self.max_retained:
            for job_id in [j.id for j in self._jobs.values() if j.done][: len(self._jobs) - self.max_retained]:
                del self._jobs[job_id]

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def active(self) -> int:
        return sum(1 for j in self._jobs.values() if not j.done)
