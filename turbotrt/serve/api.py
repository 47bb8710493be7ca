"""The HTTP API (FastAPI on Ray Serve's proxy) and the jobs it drives through the stage deployments.

    POST   /v1/videos               {prompt, seed, steps, ode, image} -> 202 and the job ({"id": "video_...", ...})
    GET    /v1/videos/{id}          the job: status queued|in_progress|completed|failed, stage, step/steps, progress
    GET    /v1/videos/{id}/content  the mp4 (409 until completed)
    DELETE /v1/videos/{id}          forget a finished job and its video
    POST   /v1/videos/sync          the same request, answered with the mp4 itself
    GET    /healthz                 200 while the API runs, with the job counts
    GET    /openapi.json, /docs     the schema

The shapes follow OpenAI's video API (https://platform.openai.com/docs/api-reference/videos), as
TensorRT-LLM's `trtllm-serve` does for `/v1/videos`.

One replica, pinned to the head node: it owns the jobs folder and does no heavy work (it awaits the
stages). A stage call whose replica dies is sent again (`stage_retries` times; Serve routes it to
a live replica), and each retry is written in the job's `retries`; past that, the job fails and
says why.
"""


import asyncio
import logging
import time

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from ray import serve
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from turbotrt.serve.config import ServeConfig
from turbotrt.serve.facts import BundleFacts
from turbotrt.serve.jobs import COMPLETED, FAILED, FINISHED, IN_PROGRESS, Busy, Job, JobStore, NotFound
from turbotrt.serve.validation import BadRequest, VideoRequest, check, parse_form, parse_json

logger = logging.getLogger("ray.serve")
HEAD_NODE = "node:__internal_head__"  # a resource only the head node has
# Errors that mean "the replica (or its node) went away", not "the stage's code failed".
REPLICA_LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError)

app = FastAPI(title="turbotrt", summary="Video generation from a turbotrt bundle (TurboDiffusion Wan models)",
              version="1")


def error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None, **extra):
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": param, "code": code}, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request, exc):
    first = exc.errors()[0]
    return error(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}")


class StageFailed(Exception):
    pass


# Helpers sit above the API class: serve.ingress copies the app's routes when the class is defined.
async def _read(request: Request, limit: int) -> bytes:
    """The body, refused past `limit` bytes even when no Content-Length announced its size."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the body is over {limit:,} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _last_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[-1].strip()


_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": VideoRequest.model_json_schema()},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["prompt"],
            "properties": {"prompt": {"type": "string"}, "seed": {"type": "integer"}, "steps": {"type": "integer"},
                           "ode": {"type": "boolean"}, "image": {"type": "string", "format": "binary"}}}},
    },
}
_JOB = {"description": "The job", "content": {"application/json": {}}}
_MP4 = {"description": "The video", "content": {"video/mp4": {}}}


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE: 0.001}})
@serve.ingress(app)
class VideoAPI:
    async def __init__(self, facts: BundleFacts, config: ServeConfig, text_encoder, denoiser, decoder,
                       image_encoder=None):
        from turbotrt.core.tokenizer import Tokenizer

        self.facts, self.config = facts, config
        self.stages = {"text_encoder": text_encoder, "image_encoder": image_encoder, "denoiser": denoiser,
                       "decoder": decoder}
        self.tokenizer = Tokenizer(facts.tokenizer, text_len=facts.text_len)
        self.store = JobStore(config.jobs_path, facts.name, facts.digest, config.queue_size, config.max_results,
                              config.result_ttl_s)
        if self.store.unreadable:
            logger.warning(f"{config.jobs_path}: left alone {len(self.store.unreadable)} job records this version "
                           f"cannot read: {', '.join(self.store.unreadable[:5])}")
        self.done: dict[str, asyncio.Event] = {}
        self.tasks: set[asyncio.Task] = set()
        for job in self.store.unfinished():
            self._resume(job)
        self._spawn(self._sweep_forever())

    # --- HTTP -----------------------------------------------------------------------------------------
    @app.post("/v1/videos", status_code=202, openapi_extra={"requestBody": _REQUEST_BODY}, responses={202: _JOB},
              summary="Queue a video; poll GET /v1/videos/{id}, then fetch /content")
    async def create(self, request: Request):
        job = await self._submit(request)
        return job if isinstance(job, JSONResponse) else JSONResponse(job.public(), status_code=202)

    @app.post("/v1/videos/sync", openapi_extra={"requestBody": _REQUEST_BODY}, responses={200: _MP4},
              summary="Make a video and answer with the mp4 (504 with the job id past sync_timeout_s)")
    async def create_sync(self, request: Request):
        job = await self._submit(request)
        if isinstance(job, JSONResponse):
            return job
        try:
            await asyncio.wait_for(self.done[job.id].wait(), self.config.sync_timeout_s)
        except asyncio.TimeoutError:
            return error(504, f"{job.id} is not finished after {self.config.sync_timeout_s:g} s; it goes on: poll "
                              f"GET /v1/videos/{job.id}", code="timeout", video=job.public())
        return self._content(job)

    @app.get("/v1/videos/{video_id}", responses={200: _JOB}, summary="A job's status and step progress")
    async def status(self, video_id: str):
        try:
            return self.store.get(video_id).public()
        except NotFound as e:
            return error(404, str(e), "video_id", "not_found")

    @app.get("/v1/videos/{video_id}/content", responses={200: _MP4}, summary="The finished video (mp4)")
    async def content(self, video_id: str):
        try:
            return self._content(self.store.get(video_id))
        except NotFound as e:
            return error(404, str(e), "video_id", "not_found")

    @app.delete("/v1/videos/{video_id}", summary="Forget a finished job and its video")
    async def delete(self, video_id: str):
        try:
            job = self.store.get(video_id)
        except NotFound as e:
            return error(404, str(e), "video_id", "not_found")
        if job.status not in FINISHED:
            return error(409, f"{video_id} is {job.status}; only finished videos can be deleted", code="not_finished")
        self.store.remove(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/healthz", summary="Liveness, the model and the job counts")
    async def healthz(self):
        return {"status": "ok", "model": self.facts.name, "i2v": self.facts.i2v,
                "size": f"{self.facts.width}x{self.facts.height}", "frames": self.facts.frames,
                "jobs": self.store.counts(), "queue_size": self.config.queue_size}

    async def _submit(self, request: Request) -> Job | JSONResponse:
        try:
            parsed, image = await self._parse(request)
            job_request = check(parsed, image, self.facts, self.tokenizer, self.config.max_image_bytes)
            job = self.store.submit(job_request)
        except BadRequest as e:
            return error(e.status, str(e), e.param)
        except Busy as e:
            return error(503, str(e), code="busy", headers={"Retry-After": str(e.retry_after)})
        self._start(job)
        return job

    async def _parse(self, request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        limit = self.config.max_image_bytes * 4 // 3 + 65536  # base64 image plus the other fields
        if int(request.headers.get("content-length") or 0) > limit:
            raise BadRequest(f"the body is over {limit:,} bytes", status=413)
        if kind == "application/json":
            return parse_json(await _read(request, limit))
        if kind == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=len(VideoRequest.model_fields))
            except (HTTPException, MultiPartException) as e:
                raise BadRequest(f"the multipart body cannot be read: {getattr(e, 'detail', e)}") from None
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            files = {k: v for k, v in form.items() if not isinstance(v, str)}
            if set(files) - {"image"}:
                raise BadRequest(f"unknown file field {sorted(set(files) - {'image'})[0]!r}; the image goes in 'image'")
            image = await files["image"].read() if "image" in files else None
            return parse_form(fields, image)
        raise BadRequest(f"send application/json or multipart/form-data, not {kind or 'no content type'!r}", status=415)

    def _content(self, job: Job):
        if job.status == COMPLETED:
            return FileResponse(self.store.video(job), media_type="video/mp4", filename=f"{job.id}.mp4",
                                headers={"X-Video-Id": job.id})
        if job.status == FAILED:
            return error(500, f"{job.id} failed: {job.error['message']}", code=job.error["code"], video=job.public())
        where = f"step {job.step}/{job.steps}" if job.stage == "denoiser" else job.stage or "waiting"
        return error(409, f"{job.id} is {job.status} ({where}); poll GET /v1/videos/{job.id}", code="not_ready",
                     video=job.public())

    # --- jobs -------------------------------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        self.done[job.id] = asyncio.Event()
        self._spawn(self._run(job))

    def _resume(self, job: Job) -> None:
        """A job the previous replica of this API was running when it stopped."""
        if job.bundle != self.facts.digest:
            self.store.fail(job, "restarted", "the server restarted with another bundle before this job finished")
        elif job.attempts > self.config.stage_retries:
            self.store.fail(job, "restarted", f"the API replica stopped {job.attempts} times during this job")
        else:
            job.retries.append("api: the API replica restarted; the job starts again")
            self._start(job)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, job: Job) -> None:
        try:
            request = self.store.request(job)
            self.store.start(job)
            await asyncio.wait_for(self._stages(job, request), self.config.job_timeout_s)
        except asyncio.TimeoutError:
            self.store.fail(job, "timeout", f"not finished after {self.config.job_timeout_s:g} s (job_timeout_s)")
        except StageFailed as e:
            self.store.fail(job, "stage_failed", str(e))
        except Exception as e:  # a job ends with a reason whatever went wrong, never silently
            self.store.fail(job, "internal_error", f"{type(e).__name__}: {_first_line(e)}")
        finally:
            self.done.pop(job.id).set()

    async def _stages(self, job: Job, request) -> None:
        start = time.perf_counter()
        units = job.steps + (3 if request.image is not None else 2)  # text, [image], steps, decode

        def advance(stage, step=None):
            job.stage, job.step = stage, job.step if step is None else step
            if stage != "text_encoder":  # queued until the text encoder has taken it: the stages' queues are Serve's
                job.status = IN_PROGRESS
            done = {"text_encoder": 0, "image_encoder": 1, "denoiser": 1 + job.has_image + job.step,
                    "decoder": units - 1}[stage]
            job.progress = int(100 * done / units)
            self.store.save(job)

        context = await self._call(job, "text_encoder", advance, lambda h: h.encode.remote(request.prompt), "text")
        y = None
        if request.image is not None:
            y = await self._call(job, "image_encoder", advance, lambda h: h.encode.remote(request.image), "image")

        async def sample(handle):
            stream = handle.options(stream=True).sample.remote(context, request.seed, request.steps, y, request.ode)
            async for event in stream:
                if "latents" in event:
                    job.timings.update(event["timings"])
                    return event["latents"]
                advance("denoiser", event["step"])
            raise StageFailed("denoiser: the stream ended without latents")

        latents = await self._call(job, "denoiser", advance, sample)
        mp4 = await self._call(job, "decoder", advance, lambda h: h.decode.remote(latents), "vae")
        job.timings["total"] = time.perf_counter() - start
        self.store.complete(job, mp4)

    async def _call(self, job: Job, stage: str, advance, call, timing: str | None = None):
        """One stage call, sent again while its replica dies (at most stage_retries times)."""
        handle = self.stages[stage]
        for attempt in range(self.config.stage_retries + 1):
            advance(stage, 0 if stage == "denoiser" else None)
            try:
                out = await call(handle)
            except REPLICA_LOST as e:
                reason = f"{stage}: its replica stopped ({type(e).__name__}: {_last_line(e)})"
                if attempt == self.config.stage_retries:
                    raise StageFailed(f"{reason}; gave up after {attempt + 1} tries") from None
                job.retries.append(reason + "; sent again")
                self.store.save(job)
                await asyncio.sleep(0.5 * (attempt + 1))  # a replica that is only unreachable may come back
                continue
            except StageFailed:
                raise
            except Exception as e:  # the stage's own error (RayTaskError wraps it): not retried, it would recur
                cause = getattr(e, "cause", None) or e
                raise StageFailed(f"{stage}: {type(cause).__name__}: {_first_line(cause)}") from None
            if timing is None:
                return out
            job.timings[timing] = out["seconds"]
            return out["out"]

    async def _sweep_forever(self) -> None:
        period = min(60.0, self.config.result_ttl_s / 2)
        while True:
            await asyncio.sleep(period)
            self.store.sweep()
