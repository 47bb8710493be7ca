"""Jobs on disk: one folder per job with its request, its record (job.json) and, once done, video.mp4.

No job is dropped silently. A job is queued, in_progress, completed or failed (failed says why),
and is kept until it is deleted or `result_ttl_s` after it finished; its record says when
(`expires_at`). Records are on disk, so an API replica that restarts finds the jobs it was running
and starts them again (`attempts` counts the starts). Both bounds are explicit: at most
`queue_size` unfinished jobs and `max_results` finished ones; past either, `submit` raises `Busy`
with a Retry-After estimate instead of growing without limit.

Plain Python, no Ray: the API replica owns one JobStore and calls it from its event loop only.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

QUEUED, IN_PROGRESS, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
FINISHED = (COMPLETED, FAILED)
ID_PATTERN = re.compile(r"video_[0-9a-f]{32}")


class Busy(Exception):
    """The queue or the results store is full: HTTP 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(KeyError):
    def __str__(self):
        return self.args[0]


@dataclass
class JobRequest:
    prompt: str
    seed: int = 0
    steps: int = 4
    ode: bool = False
    image: np.ndarray | None = None  # uint8 [H, W, 3] for I2V


@dataclass
class Job:
    id: str
    model: str
    bundle: str  # digest of the bundle's manifest
    seed: int
    steps: int
    ode: bool
    has_image: bool
    created_at: float
    status: str = QUEUED
    stage: str | None = None  # the stage the job was last sent to
    step: int = 0  # DiT steps done
    progress: int = 0  # percent
    started_at: float | None = None
    completed_at: float | None = None
    expires_at: float | None = None
    attempts: int = 0
    retries: list = field(default_factory=list)  # why a stage call was repeated
    error: dict | None = None  # {"code", "message"} when failed
    timings: dict = field(default_factory=dict)  # stage -> seconds, as Pipeline's Result.timings

    def public(self) -> dict:
        """The job as the API shows it (OpenAI-style video object, plus step progress)."""
        out = {"id": self.id, "object": "video", "model": self.model, "status": self.status,
               "progress": self.progress, "stage": self.stage, "step": self.step, "steps": self.steps,
               "seed": self.seed, "ode": self.ode, "created_at": _int(self.created_at),
               "started_at": _int(self.started_at), "completed_at": _int(self.completed_at),
               "expires_at": _int(self.expires_at), "attempts": self.attempts, "retries": self.retries,
               "error": self.error, "timings": {k: round(v, 4) for k, v in self.timings.items()}}
        return out


def _int(t):
    return None if t is None else int(t)


class JobStore:
    def __init__(self, root: str | os.PathLike, model: str, bundle: str, queue_size: int, max_results: int,
                 result_ttl_s: float, clock=time.time):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.model, self.bundle = model, bundle
        self.queue_size, self.max_results, self.ttl = queue_size, max_results, result_ttl_s
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        self.durations: deque[float] = deque(maxlen=32)  # recent job wall times, for Retry-After
        self.unreadable: list[str] = []  # records another version wrote, or damaged: left alone, reported
        for folder in sorted(self.root.iterdir()):
            record = folder / "job.json"
            if ID_PATTERN.fullmatch(folder.name) and record.is_file():
                try:
                    self.jobs[folder.name] = Job(**json.loads(record.read_text()))
                except (ValueError, TypeError):
                    self.unreadable.append(folder.name)

    # --- what a restarted replica finds --------------------------------------------------------------
    def unfinished(self) -> list[Job]:
        """Jobs queued or running when the previous replica stopped, oldest first."""
        return sorted((j for j in self.jobs.values() if j.status not in FINISHED), key=lambda j: j.created_at)

    # --- lifecycle -----------------------------------------------------------------------------------
    def submit(self, request: JobRequest) -> Job:
        self.sweep()
        active = sum(j.status not in FINISHED for j in self.jobs.values())
        if active >= self.queue_size:
            raise Busy(f"the queue is full ({active} videos queued or in progress); retry later", self._retry_after())
        kept = [j for j in self.jobs.values() if j.status in FINISHED]
        if len(kept) >= self.max_results:
            wait = max(1, math.ceil(min(j.expires_at for j in kept) - self.clock()))
            raise Busy(f"{len(kept)} finished videos are kept, the most this server keeps: fetch and DELETE "
                       f"them, or retry once the oldest expires", wait)
        job = Job(id=f"video_{uuid.uuid4().hex}", model=self.model, bundle=self.bundle, seed=request.seed,
                  steps=request.steps, ode=request.ode, has_image=request.image is not None,
                  created_at=self.clock())
        folder = self.folder(job.id)
        folder.mkdir()
        _write(folder / "request.json", json.dumps({"prompt": request.prompt}).encode())
        if request.image is not None:
            np.save(folder / "image.npy", request.image)
        self.save(job)
        self.jobs[job.id] = job
        return job

    def request(self, job: Job) -> JobRequest:
        folder = self.folder(job.id)
        prompt = json.loads((folder / "request.json").read_text())["prompt"]
        image = np.load(folder / "image.npy") if job.has_image else None
        return JobRequest(prompt, job.seed, job.steps, job.ode, image)

    def start(self, job: Job) -> None:
        """Sent to the first stage: still `queued` (the caller marks it in_progress once a stage took it)."""
        job.status, job.attempts, job.started_at = QUEUED, job.attempts + 1, self.clock()
        job.stage, job.step, job.progress, job.timings = None, 0, 0, {}
        self.save(job)

    def complete(self, job: Job, mp4: bytes) -> None:
        _write(self.folder(job.id) / "video.mp4", mp4)
        self._finish(job, COMPLETED)
        self.durations.append(job.completed_at - job.started_at)

    def fail(self, job: Job, code: str, message: str) -> None:
        job.error = {"code": code, "message": message}
        self._finish(job, FAILED)

    def _finish(self, job: Job, status: str) -> None:
        job.status, job.completed_at = status, self.clock()
        job.expires_at = job.completed_at + self.ttl
        if status == COMPLETED:
            job.progress = 100
        self.save(job)

    def save(self, job: Job) -> None:
        _write(self.folder(job.id) / "job.json", json.dumps(asdict(job)).encode())

    # --- reading and removing --------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id) if ID_PATTERN.fullmatch(job_id) else None
        if job is not None and job.expires_at is not None and job.expires_at <= self.clock():
            self.remove(job_id)
            job = None
        if job is None:
            raise NotFound(f"no video {job_id!r}: unknown id, or it expired (finished videos are kept "
                           f"{self.ttl:g} s, or until deleted)")
        return job

    def video(self, job: Job) -> Path:
        return self.folder(job.id) / "video.mp4"

    def remove(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    def sweep(self) -> int:
        """Remove expired jobs; returns how many."""
        now = self.clock()
        expired = [j.id for j in self.jobs.values() if j.expires_at is not None and j.expires_at <= now]
        for job_id in expired:
            self.remove(job_id)
        return len(expired)

    def counts(self) -> dict:
        by = {s: 0 for s in (QUEUED, IN_PROGRESS, COMPLETED, FAILED)}
        for j in self.jobs.values():
            by[j.status] += 1
        return by

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def _retry_after(self) -> int:
        """About one job's time: when a slot is likely to free up (10 s before any job finished)."""
        return max(1, math.ceil(statistics.median(self.durations))) if self.durations else 10


def _write(path: Path, data: bytes) -> None:
    """Atomic: a reader (or a restarted replica) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)
