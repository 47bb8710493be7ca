"""Requests to `POST /v1/videos`: the schema, and checks against the bundle that say what is wrong.

A body is JSON (`image` base64, a `data:` URL is fine) or multipart/form-data (`image` a file).
Every check raises `BadRequest` with a one-line message naming the field; nothing is coerced
silently (unknown fields are errors, a T2V bundle refuses an image rather than ignoring it).
"""

from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from turbotrt.core.rcm import MAX_STEPS
from turbotrt.serve.facts import BundleFacts
from turbotrt.serve.jobs import JobRequest

MAX_PROMPT_CHARS = 10_000  # a cheap bound before tokenizing; the text encoder's token limit is the real one
MAX_SEED = 2**64 - 1  # the Philox noise stream's key


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class VideoRequest(BaseModel):
    """A text-to-video or image-to-video request (which one is the bundle's: I2V bundles need `image`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What the video shows.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the sampler's noise; one seed, one video.")
    steps: int = Field(4, ge=1, le=MAX_STEPS, description=f"rCM sampling steps, 1 to {MAX_STEPS}.")
    ode: bool = Field(False, description="Deterministic ODE steps instead of rCM's stochastic ones.")
    image: str | None = Field(None, description="Image-to-video bundles only: the first frame at the bundle's "
                              "resolution, base64 PNG or JPEG (in multipart bodies, a file field).")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt is empty")
        return prompt


FIELDS = tuple(VideoRequest.model_fields)


def parse_json(body: bytes) -> tuple[VideoRequest, bytes | None]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object with {', '.join(FIELDS)}")
    request = _validate(data)
    return request, (_base64(request.image) if request.image is not None else None)


def parse_form(fields: dict, image: bytes | None) -> tuple[VideoRequest, bytes | None]:
    """Multipart: text fields as strings (converted by the schema), the image as a file's bytes."""
    if isinstance(fields.get("image"), str):  # a base64 text field rather than a file
        image = _base64(fields.pop("image"))
    return _validate(fields), image


def _validate(data: dict) -> VideoRequest:
    try:
        return VideoRequest.model_validate(data)
    except ValidationError as e:
        raise BadRequest(*_explain(e.errors()[0])) from None


def _explain(error: dict) -> tuple[str, str | None]:
    """One pydantic error as one line a client can act on."""
    field = str(error["loc"][0]) if error["loc"] else None
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return f"{field} is required", field
    if kind == "extra_forbidden":
        return f"unknown field {field!r} (fields: {', '.join(FIELDS)})", field
    if field == "steps" and kind in ("greater_than_equal", "less_than_equal"):
        return f"steps must be 1 to {MAX_STEPS} (rCM samples in 1 to {MAX_STEPS} steps); got {value}", field
    if field == "seed" and kind in ("greater_than_equal", "less_than_equal"):
        return f"seed must be 0 to 2^64-1; got {value}", field
    if field == "prompt" and kind == "string_too_short":
        return "prompt is empty", field
    if field == "prompt" and kind == "string_too_long":
        return f"prompt is {len(value)} characters; the most is {MAX_PROMPT_CHARS}", field
    message = error["msg"].removeprefix("Value error, ")
    return (f"{field}: {message}" if field and not message.startswith(field) else message), field


def _base64(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64 (send the file's bytes base64-encoded, or a multipart file)",
                         "image") from None


def decode_image(data: bytes, facts: BundleFacts) -> np.ndarray:
    """Image file bytes -> uint8 [H, W, 3], checked against the bundle's size before decoding pixels."""
    import av

    want = f"{facts.width}x{facts.height}"
    try:
        with av.open(io.BytesIO(data)) as src:
            if not src.streams.video:
                raise ValueError("no picture")
            ctx = src.streams.video[0].codec_context
            if (ctx.width, ctx.height) != (facts.width, facts.height):
                raise BadRequest(f"image is {ctx.width}x{ctx.height}; {facts.name} makes {want} videos: "
                                 f"resize the image to {want}", "image")
            frame = next(src.decode(video=0))
            return frame.to_ndarray(format="rgb24")
    except BadRequest:
        raise
    except (av.error.FFmpegError, ValueError, StopIteration, IndexError):
        raise BadRequest("image is not a picture FFmpeg can read: send a PNG or JPEG", "image") from None


def check(request: VideoRequest, image: bytes | None, facts: BundleFacts, tokenizer, max_image_bytes: int) -> JobRequest:
    """The request against this bundle: I2V needs an image of its size, T2V takes none, the prompt fits."""
    tokens = len(tokenizer.encode(request.prompt))
    if tokens > facts.text_len - 1:
        raise BadRequest(f"prompt is {tokens} tokens; the text encoder reads at most {facts.text_len - 1}: "
                         f"shorten it", "prompt")
    if facts.i2v and image is None:
        raise BadRequest(f"{facts.name} is image-to-video: send an image ({facts.width}x{facts.height}, base64 "
                         f"in JSON or a multipart file field 'image')", "image")
    if not facts.i2v and image is not None:
        raise BadRequest(f"{facts.name} is text-to-video: send no image", "image")
    pixels = None
    if image is not None:
        if len(image) > max_image_bytes:
            raise BadRequest(f"image is {len(image):,} bytes; the most is {max_image_bytes:,}", "image", status=413)
        pixels = decode_image(image, facts)
    return JobRequest(prompt=request.prompt, seed=request.seed, steps=request.steps, ode=request.ode, image=pixels)
