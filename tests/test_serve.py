"""`turbotrt serve` on a real local Ray instance (127.0.0.1 only) with tiny bundles.

One Ray instance for the module, two Serve apps on it (the shared tiny T2V and I2V bundles, each deployed by
the `serve` command), shut down at the end. Every wait has a deadline.
"""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec

import numpy as np
import pytest

from turbotrt.runtime.pipeline import Pipeline
from turbotrt.core.video import read_mp4
from turbotrt.serve.config import ConfigError, ServeConfig, apply, load_config, parse_assignments
from turbotrt.serve.jobs import Busy, JobRequest, JobStore, NotFound

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray's own pydantic use

HAS_RAY = find_spec("ray") is not None and find_spec("fastapi") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="needs the serve extra: pip install 'turbotrt[serve]'")
PROMPT = "a red bird flies over a river at night"
JOB_TIMEOUT_S = 120


# --- without Ray --------------------------------------------------------------------------------------
def test_runtime_and_the_serve_command_import_no_ray():
    code = ("import sys, turbotrt.runtime.pipeline, turbotrt.runtime.backends, turbotrt.serve.cli, "
            "turbotrt.serve.config, turbotrt.serve.jobs; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_without_ray_says_how_to_install_in_one_line(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from turbotrt.serve.cli import serve_command

    monkeypatch.setitem(sys.modules, "ray.serve", None)  # `import ray.serve` now fails as if not installed
    r = CliRunner().invoke(serve_command, [str(tmp_path)])
    assert r.exit_code == 1
    assert r.output == "Error: turbotrt serve needs Ray Serve: pip install 'turbotrt[serve]'\n"


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("port: 9000\nstages:\n  denoiser:\n    autoscaling_config: {min_replicas: 1, max_replicas: 4}\n"
                    "    ray_actor_options: {num_gpus: 1}\n")
    config = load_config(path)
    assert config.port == 9000 and config.host == "127.0.0.1"
    den = config.stage_options("denoiser")
    assert "num_replicas" not in den and den["autoscaling_config"]["max_replicas"] == 4
    assert den["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1}  # merged into the default, not replacing it
    assert config.replicas_text("denoiser") == "1-4 replicas (autoscaling), num_gpus 1, num_cpus 0.5 each"
    assert parse_assignments(("denoiser=2", "decoder=1"), "--replicas", int) == {"denoiser": 2, "decoder": 1}
    for bad, message in [({"prot": 1}, "unknown setting 'prot'"), ({"port": "80"}, "port must be an integer"),
                         ({"queue_size": 0}, "queue_size must be positive"),
                         ({"stages": {"dit": {}}}, "unknown stage 'dit'"),
                         ({"stages": {"decoder": {"replicas": 2}}}, "unknown option 'replicas'"),
                         ({"stages": {"decoder": {"num_replicas": 2, "autoscaling_config": {}}}}, "not both")]:
        with pytest.raises(ConfigError, match=message):
            apply(ServeConfig(), bad)
    with pytest.raises(ConfigError, match="STAGE=NUMBER"):
        parse_assignments(("dit=2",), "--replicas", int)


def test_job_store_bounds_expiry_and_restart(tmp_path):
    now = [1000.0]
    store = JobStore(tmp_path, "m", "d", queue_size=2, max_results=2, result_ttl_s=60, clock=lambda: now[0])
    a, b = store.submit(JobRequest("a")), store.submit(JobRequest("b", seed=5))
    with pytest.raises(Busy) as full:
        store.submit(JobRequest("c"))
    assert full.value.retry_after == 10  # no job finished yet: the fallback estimate
    store.start(a)
    now[0] += 4
    store.complete(a, b"mp4")
    store.fail(b, "stage_failed", "why")
    assert store.get(b.id).public()["error"] == {"code": "stage_failed", "message": "why"}
    with pytest.raises(Busy, match="finished videos are kept") as kept:
        store.submit(JobRequest("d"))
    assert kept.value.retry_after == 60  # until the oldest result expires
    restarted = JobStore(tmp_path, "m", "d", queue_size=2, max_results=2, result_ttl_s=60, clock=lambda: now[0])
    assert restarted.get(a.id).status == "completed" and restarted.video(a).read_bytes() == b"mp4"
    assert restarted.request(restarted.get(b.id)).seed == 5
    now[0] += 61
    with pytest.raises(NotFound, match="expired"):
        restarted.get(a.id)
    assert restarted.sweep() == 1 and not (tmp_path / b.id).exists()
    c = restarted.submit(JobRequest("c"))
    assert [j.id for j in JobStore(tmp_path, "m", "d", 2, 2, 60).unfinished()] == [c.id]  # resumed after a restart


# --- one Ray instance, two apps -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_instance():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage reports leave the machine
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the node's address is 127.0.0.1, not the LAN's
    # Serve's proxy gets 5 s to come up by default: too little on 2 cores shared with another test worker.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()  # stops every process of this local instance, replicas included


@pytest.fixture(scope="module")
def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy(ray, bundle, port, name, tmp, **settings) -> str:
    """Deploy with the `turbotrt serve` command itself (detached onto the running instance)."""
    from click.testing import CliRunner

    from turbotrt.serve.cli import serve_command

    # Logical CPUs only (two apps share 2 cores' worth); a dead replica is noticed within a second, and
    # a live one that a loaded machine slows down is given a minute to answer its health check.
    light = {"ray_actor_options": {"num_cpus": 0.1}, "health_check_period_s": 1, "health_check_timeout_s": 60}
    config = {"app_name": name, "route_prefix": f"/{name}", "jobs_dir": str(tmp / "jobs"),
              "stages": {s: light for s in ("text_encoder", "image_encoder", "denoiser", "decoder")}, **settings}
    (tmp / "serve.yaml").write_text(json.dumps(config))  # JSON is YAML
    r = CliRunner().invoke(serve_command, [str(bundle), "--config", str(tmp / "serve.yaml"), "--port", str(port),
                                           "--address", ray.get_runtime_context().gcs_address, "--detach"])
    assert r.exit_code == 0, r.output
    assert f"serving {'wan-tiny-i2v' if 'i2v' in name else 'wan-tiny'} at http://127.0.0.1:{port}/{name}" in r.output
    return f"http://127.0.0.1:{port}/{name}"


@pytest.fixture(scope="module")
def t2v_pipe(tiny_bundle):
    return Pipeline.from_bundle(tiny_bundle("sagesla"), backend="ort", log=lambda *_: None)


@pytest.fixture(scope="module")
def t2v(t2v_pipe, ray_instance, port, tmp_path_factory):
    url = _deploy(ray_instance, t2v_pipe.bundle.root, port, "t2v", tmp_path_factory.mktemp("t2v"), queue_size=16)
    return url, t2v_pipe


@pytest.fixture(scope="module")
def i2v(tiny_bundle, ray_instance, port, tmp_path_factory):
    bundle = tiny_bundle("i2v")
    url = _deploy(ray_instance, bundle, port, "i2v", tmp_path_factory.mktemp("i2v"), queue_size=3, stage_retries=0)
    return url, Pipeline.from_bundle(bundle, backend="ort", log=lambda *_: None)


# --- HTTP helpers ------------------------------------------------------------------------------------------
def call(method, url, body=None, data=None, ctype="application/json", timeout=60):
    """(status, headers, body bytes); JSON bodies are parsed."""
    if body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": ctype} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read()
    if headers.get("content-type", "").startswith("application/json"):
        return status, headers, json.loads(raw)
    return status, headers, raw


def wait_done(url, job_id, seen=None, timeout=JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, job = call("GET", f"{url}/v1/videos/{job_id}")
        assert status == 200, job
        if seen is not None:
            seen.append((job["status"], job["stage"], job["step"]))
        if job["status"] in ("completed", "failed"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"{job_id} not finished after {timeout} s: {job}")


_references: dict = {}


def reference_frames(pipe, tmp_path, seed, steps=4, image=None) -> np.ndarray:
    """What `turbotrt run` writes for this seed (Pipeline, then Result.save), read back; made once per
    (bundle, seed, steps), as the tests reuse seeds."""
    key = (str(pipe.bundle.root), seed, steps, image is not None)
    if key not in _references:
        path = pipe(PROMPT, seed=seed, steps=steps, image=image).save(tmp_path / f"ref-{seed}-{steps}.mp4")
        _references[key] = read_mp4(path)
    return _references[key]


def served_frames(mp4: bytes, tmp_path) -> np.ndarray:
    path = tmp_path / f"served-{uuid.uuid4().hex}.mp4"
    path.write_bytes(mp4)
    return read_mp4(path)


def png(image: np.ndarray) -> bytes:
    import av

    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(image, format="rgb24")) + codec.encode(None)
    return b"".join(bytes(p) for p in packets)


def first_frame(h=64, w=128) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=-1).astype(np.uint8)


def replica(ray, app, deployment):
    """The (only) replica actor of a deployment, resolved before the moment to kill it."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no replica of {deployment} in {app}")


DEPLOYMENTS = {"text_encoder": "TextEncoder", "image_encoder": "ImageEncoder", "denoiser": "Denoiser",
               "decoder": "Decoder"}


def kill_mid_steps(ray, url, app, job_ids, timeout=JOB_TIMEOUT_S) -> None:
    """Kill the DiT replica while it runs a job with at least two steps left: a job before its first
    step may only be waiting in Serve's router, and one at its last step may finish before the kill
    lands, so neither would show the failure. The other jobs queue behind it."""
    actor = replica(ray, app, "Denoiser")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job_id in job_ids:
            job = call("GET", f"{url}/v1/videos/{job_id}")[2]
            if job["status"] == "in_progress" and job["stage"] == "denoiser" and 1 <= job["step"] <= job["steps"] - 2:
                ray.kill(actor, no_restart=True)
                return
        time.sleep(0.002)
    raise AssertionError("no job was seen running on the DiT replica with two steps left")


# --- text to video ---------------------------------------------------------------------------------------
@needs_ray
def test_one_request_end_to_end_equals_the_runtime(t2v, tmp_path):
    url, pipe = t2v
    assert call("GET", f"{url}/healthz")[2]["model"] == "wan-tiny"
    status, _, job = call("POST", f"{url}/v1/videos", {"prompt": PROMPT, "seed": 7, "steps": 4})
    assert status == 202 and job["status"] == "queued" and job["id"].startswith("video_")
    seen = []
    done = wait_done(url, job["id"], seen)
    assert done["status"] == "completed", done
    assert (done["progress"], done["step"], done["steps"], done["attempts"], done["retries"]) == (100, 4, 4, 1, [])
    assert {"text", "step_0", "step_3", "vae", "total"} <= set(done["timings"])
    assert done["expires_at"] > done["completed_at"]
    assert all(step <= 4 for _, stage, step in seen) and {s for s, _, _ in seen} <= {"queued", "in_progress", "completed"}
    status, headers, mp4 = call("GET", f"{url}/v1/videos/{job['id']}/content")
    assert status == 200 and headers["content-type"] == "video/mp4"
    frames = served_frames(mp4, tmp_path)
    assert frames.shape == (pipe.bundle.profile.frames, 64, 128, 3)
    np.testing.assert_array_equal(frames, reference_frames(pipe, tmp_path, seed=7))
    assert not np.array_equal(frames, reference_frames(pipe, tmp_path, seed=8))  # the seed matters

    status, headers, mp4 = call("POST", f"{url}/v1/videos/sync", {"prompt": PROMPT, "seed": 8, "steps": 4})
    assert status == 200 and headers["X-Video-Id"].startswith("video_")
    np.testing.assert_array_equal(served_frames(mp4, tmp_path), reference_frames(pipe, tmp_path, seed=8))

    assert call("DELETE", f"{url}/v1/videos/{job['id']}")[2]["deleted"] is True
    assert call("GET", f"{url}/v1/videos/{job['id']}")[0] == 404


@needs_ray
def test_eight_concurrent_requests_all_complete_correctly(t2v, tmp_path):
    url, pipe = t2v
    seeds = list(range(100, 108))
    start = time.monotonic()
    with ThreadPoolExecutor(len(seeds)) as pool:
        answers = list(pool.map(lambda s: call("POST", f"{url}/v1/videos/sync", {"prompt": PROMPT, "seed": s, "steps": 4},
                                               timeout=JOB_TIMEOUT_S), seeds))
    wall = time.monotonic() - start
    assert [a[0] for a in answers] == [200] * len(seeds), [a[2] for a in answers if a[0] != 200]
    for seed, (_, _, mp4) in zip(seeds, answers):
        np.testing.assert_array_equal(served_frames(mp4, tmp_path), reference_frames(pipe, tmp_path, seed))
    assert len({a[2] for a in answers}) == len(seeds)
    assert wall < JOB_TIMEOUT_S


BAD_T2V = [
    ({"prompt": PROMPT, "steps": 0}, 400, "steps must be 1 to 4"),
    ({"prompt": PROMPT, "steps": 5}, 400, "steps must be 1 to 4"),
    ({"prompt": PROMPT, "steps": "four"}, 400, "steps: Input should be a valid integer"),
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"prompt": " \n "}, 400, "prompt is empty"),
    ({"prompt": "word " * 600}, 400, "the text encoder reads at most 511"),
    ({"prompt": "x" * 10_001}, 400, "prompt is 10001 characters; the most is 10000"),
    ({"seed": 1}, 400, "prompt is required"),
    ({"prompt": PROMPT, "seed": -1}, 400, "seed must be 0 to 2^64-1"),
    ({"prompt": PROMPT, "seed": 2**64}, 400, "seed must be 0 to 2^64-1"),
    ({"prompt": PROMPT, "size": "720p"}, 400, "unknown field 'size'"),
    ({"prompt": PROMPT, "image": base64.b64encode(png(first_frame())).decode()}, 400, "text-to-video: send no image"),
]


@needs_ray
@pytest.mark.parametrize("body,status,message", BAD_T2V, ids=[m for _, _, m in BAD_T2V])
def test_bad_t2v_requests_are_refused_with_a_clear_message(t2v, body, status, message):
    got, _, answer = call("POST", f"{t2v[0]}/v1/videos", body)
    assert got == status and message in answer["error"]["message"], answer
    assert "\n" not in answer["error"]["message"]


@needs_ray
def test_bad_bodies_and_unknown_ids(t2v):
    url = t2v[0]
    answer = call("POST", f"{url}/v1/videos", data=b"{not json", ctype="application/json")
    assert answer[0] == 400 and "not valid JSON" in answer[2]["error"]["message"]
    answer = call("POST", f"{url}/v1/videos", data=b"prompt=x", ctype="application/x-www-form-urlencoded")
    assert answer[0] == 415 and "multipart/form-data" in answer[2]["error"]["message"]
    for path in ("video_" + "0" * 32, "video_0" + "/content", "../etc"):
        answer = call("GET", f"{url}/v1/videos/{path}")
        assert answer[0] == 404, answer
    schema = call("GET", f"{url}/openapi.json")[2]
    assert {"/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content", "/v1/videos/sync",
            "/healthz"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/v1/videos"]["post"]["requestBody"]["content"]


@needs_ray
def test_a_replica_killed_mid_request_is_retried_and_the_service_keeps_serving(t2v, ray_instance, tmp_path):
    url, pipe = t2v
    seeds = list(range(100, 106))  # the concurrent test's: their references are made already
    # 4 steps each: the DiT, fed faster than it steps, has a backlog while the first job is mid-steps
    ids = [call("POST", f"{url}/v1/videos", {"prompt": PROMPT, "seed": s, "steps": 4})[2]["id"] for s in seeds]
    kill_mid_steps(ray_instance, url, "t2v", ids)
    jobs = [wait_done(url, i) for i in ids]
    assert [j["status"] for j in jobs] == ["completed"] * len(ids), jobs
    retried = [j for j in jobs if j["retries"]]
    assert retried, f"killing the DiT replica mid-steps interrupted no job: {jobs}"
    assert all("denoiser: its replica stopped" in r for j in retried for r in j["retries"]), retried
    for seed, job_id in zip(seeds, ids):  # a retried job starts its steps again: same seed, same video
        mp4 = call("GET", f"{url}/v1/videos/{job_id}/content")[2]
        np.testing.assert_array_equal(served_frames(mp4, tmp_path), reference_frames(pipe, tmp_path, seed))
    assert call("POST", f"{url}/v1/videos/sync", {"prompt": PROMPT, "seed": 1, "steps": 1})[0] == 200


@needs_ray
def test_jobs_survive_a_restart_of_the_api_replica(t2v, ray_instance, tmp_path):
    url, pipe = t2v
    seeds = [100, 101, 102]
    ids = [call("POST", f"{url}/v1/videos", {"prompt": PROMPT, "seed": s, "steps": 4})[2]["id"] for s in seeds]
    ray_instance.kill(replica(ray_instance, "t2v", "VideoAPI"), no_restart=True)  # it drives the jobs, answers HTTP
    deadline, jobs = time.monotonic() + JOB_TIMEOUT_S, {}
    while len(jobs) < len(ids) and time.monotonic() < deadline:
        for job_id in set(ids) - set(jobs):
            try:
                status, _, job = call("GET", f"{url}/v1/videos/{job_id}", timeout=10)
            except OSError:  # the proxy has no replica to send it to until the new one is up
                continue
            if status == 200 and job["status"] in ("completed", "failed"):
                jobs[job_id] = job
        time.sleep(0.1)
    assert [jobs.get(i, {}).get("status") for i in ids] == ["completed"] * len(ids), jobs
    resumed = [j for j in jobs.values() if j["attempts"] == 2]
    assert resumed, f"no job was running when the API replica was killed: {jobs}"
    assert all(j["retries"] == ["api: the API replica restarted; the job starts again"] for j in resumed), resumed
    for seed, job_id in zip(seeds, ids):
        mp4 = call("GET", f"{url}/v1/videos/{job_id}/content")[2]
        np.testing.assert_array_equal(served_frames(mp4, tmp_path), reference_frames(pipe, tmp_path, seed))


# --- image to video -----------------------------------------------------------------------------------------
@needs_ray
def test_i2v_json_and_multipart_equal_the_runtime(i2v, tmp_path):
    url, pipe = i2v
    image = first_frame()
    ref = reference_frames(pipe, tmp_path, seed=3, steps=2, image=image)
    status, _, mp4 = call("POST", f"{url}/v1/videos/sync",
                          {"prompt": PROMPT, "seed": 3, "steps": 2, "image": base64.b64encode(png(image)).decode()})
    assert status == 200, mp4
    np.testing.assert_array_equal(served_frames(mp4, tmp_path), ref)
    boundary = uuid.uuid4().hex
    fields = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                      for k, v in {"prompt": PROMPT, "seed": "3", "steps": "2"}.items())
    file = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="first.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + png(image) + f"\r\n--{boundary}--\r\n".encode()
    status, _, mp4 = call("POST", f"{url}/v1/videos/sync", data=fields + file,
                          ctype=f"multipart/form-data; boundary={boundary}")
    assert status == 200, mp4
    np.testing.assert_array_equal(served_frames(mp4, tmp_path), ref)


BAD_I2V = [
    ({"prompt": PROMPT}, 400, "image-to-video: send an image"),
    ({"prompt": PROMPT, "image": base64.b64encode(png(first_frame(64, 64))).decode()}, 400,
     "image is 64x64; wan-tiny-i2v makes 128x64 videos"),
    ({"prompt": PROMPT, "image": base64.b64encode(b"GIF? no, just text").decode()}, 400, "not a picture FFmpeg can read"),
    ({"prompt": PROMPT, "image": "not base64!"}, 400, "image is not valid base64"),
]


@needs_ray
@pytest.mark.parametrize("body,status,message", BAD_I2V, ids=[m for _, _, m in BAD_I2V])
def test_bad_i2v_requests_are_refused_with_a_clear_message(i2v, body, status, message):
    got, _, answer = call("POST", f"{i2v[0]}/v1/videos", body)
    assert got == status and message in answer["error"]["message"], answer


@needs_ray
def test_full_queue_answers_503_and_a_killed_replica_without_retries_fails_the_job_with_a_reason(i2v, ray_instance):
    url = i2v[0]  # queue_size 3, stage_retries 0
    body = {"prompt": PROMPT, "seed": 0, "steps": 4, "image": base64.b64encode(png(first_frame())).decode()}
    ids = [call("POST", f"{url}/v1/videos", dict(body, seed=s))[2]["id"] for s in range(3)]
    status, headers, answer = call("POST", f"{url}/v1/videos", body)
    assert status == 503 and int(headers["Retry-After"]) >= 1 and "queue is full" in answer["error"]["message"]
    kill_mid_steps(ray_instance, url, "i2v", ids)
    stage = "denoiser"
    jobs = [wait_done(url, i) for i in ids]
    failed = [j for j in jobs if j["status"] == "failed"]
    assert failed and all(j["status"] in ("completed", "failed") for j in jobs), jobs
    for job in failed:
        assert job["error"]["code"] == "stage_failed"
        assert job["error"]["message"].startswith(f"{stage}: its replica stopped (ActorDiedError"), job["error"]
        status, _, answer = call("GET", f"{url}/v1/videos/{job['id']}/content")
        assert status == 500 and f"failed: {stage}" in answer["error"]["message"]
    assert call("POST", f"{url}/v1/videos/sync", body)[0] == 200  # the replacement replica serves


def test_on_step_reports_each_step(t2v_pipe):
    calls = []
    pipe = t2v_pipe
    pipe.sample(pipe.encode_prompt(PROMPT), seed=0, steps=3, on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
