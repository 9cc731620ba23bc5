"""One request body -> the image tensor the certifier takes, or a `BadRequest` with its status and reason;
and a batch's results -> the answers' JSON. Pure functions (tests/unit/test_serve_requests.py).

An image is decoded exactly as `lipnext certify` reads a shard's sample (`data.transforms.decode_image`,
then `to_float_chw`), so the same PNG gives the same tensor, hence the same radius. Nothing is resized:
an image of another size is refused, because a resized image is another input and its certificate would
be about pixels the caller never sent. A JSON array is (3, H, W), channels first, values in [0, 1]; it
is rounded to fp32, the precision the model runs in (the certificate is about that tensor).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import torch

from lipnext_scale.errors import LipnextError

JSON_TYPES = ("application/json",)
IMAGE_TYPES = ("image/png", "image/jpeg", "application/octet-stream")
# What `curl --data-binary` sends when told nothing, and no header at all: the body's first byte decides.
SNIFFED_TYPES = ("", "application/x-www-form-urlencoded", "text/plain")
IMAGE_FORMATS = ("PNG", "JPEG")
BYTES_PER_VALUE = 32  # a JSON pixel value with full float64 digits and its separator, rounded up


class BadRequest(LipnextError, ValueError):
    """The request cannot be certified; `status` is its 4xx code and the message one line saying why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def max_request_bytes(image_size: int) -> int:
    """The largest body accepted for a model taking image_size x image_size images: a JSON array of
    3 x H x W values at full precision (a PNG or JPEG of that size is far smaller)."""
    return BYTES_PER_VALUE * 3 * image_size * image_size + 4096


def check_length(length: int, image_size: int) -> None:
    if length > max_request_bytes(image_size):
        raise BadRequest(413, f"request body of {length} bytes is over the {max_request_bytes(image_size)} "
                              f"accepted for a {image_size}x{image_size} image")


def decode_request(body: bytes, content_type: str | None, image_size: int) -> torch.Tensor:
    """(3, image_size, image_size) float32 in [0, 1] from PNG/JPEG bytes or a JSON array."""
    check_length(len(body), image_size)
    if not body.strip():
        raise BadRequest(400, "empty body: send PNG or JPEG bytes, or a JSON array (3, H, W) of values in [0, 1]")
    media = (content_type or "").split(";")[0].strip().lower()
    if media in JSON_TYPES or (media in SNIFFED_TYPES and body.lstrip()[:1] == b"["):
        return decode_json_image(body, image_size)
    if media in IMAGE_TYPES or media in SNIFFED_TYPES:
        return decode_image_bytes(body, image_size)
    raise BadRequest(415, f"Content-Type {media!r} is not accepted: send image/png, image/jpeg or application/json")


def decode_image_bytes(body: bytes, image_size: int) -> torch.Tensor:
    """PNG or JPEG bytes of exactly image_size x image_size pixels, decoded as certification reads shards.
    The size is read from the header, before any pixel is decoded."""
    from PIL import Image

    from lipnext_scale.data.transforms import SampleError, decode_image, to_float_chw

    try:
        with Image.open(io.BytesIO(body)) as header:  # parses the header only
            fmt, (width, height) = header.format, header.size
    except Image.DecompressionBombError as e:
        raise BadRequest(413, f"image too large to decode ({' '.join(str(e).split())})") from None
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadRequest(400, "the body is not an image PIL can read: send PNG or JPEG bytes, or a JSON "
                              "array (3, H, W) of values in [0, 1]") from None
    if fmt not in IMAGE_FORMATS:
        raise BadRequest(415, f"a {fmt} image: send PNG or JPEG")
    if (width, height) != (image_size, image_size):
        raise BadRequest(422, f"image is {width}x{height} but the model takes {image_size}x{image_size}; the "
                              "server never resizes: send the image at the model's size")
    try:
        return to_float_chw(decode_image(body))
    except SampleError as e:
        raise BadRequest(400, f"{fmt} {' '.join(str(e).split())}") from None


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str):
    raise _NonFinite(name)


def decode_json_image(body: bytes, image_size: int) -> torch.Tensor:
    """A JSON array (3, image_size, image_size) of finite numbers in [0, 1], as fp32."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except _NonFinite as e:
        raise BadRequest(422, f"the array holds {e}: pixel values must be finite numbers in [0, 1]") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise BadRequest(400, f"the body is not valid JSON ({reason})") from None
    expected = (3, image_size, image_size)
    if not isinstance(data, list):
        raise BadRequest(422, f"expected a JSON array of shape {expected}, got a JSON {type(data).__name__}")
    try:
        values = torch.tensor(data, dtype=torch.float64)
    except Exception:  # ragged lists, strings, objects, null: torch says so in several ways
        raise BadRequest(422, f"the array is not a {expected} array of numbers (ragged, or holds strings, "
                              "null or objects)") from None
    if tuple(values.shape) != expected:
        raise BadRequest(422, f"array of shape {tuple(values.shape)}, but the model takes {expected} (channels "
                              "first); the server never resizes")
    if not torch.isfinite(values).all():  # 1e999 parses to inf without passing through parse_constant
        raise BadRequest(422, "the array holds an infinite value: pixel values must be finite numbers in [0, 1]")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise BadRequest(422, f"values range from {low:g} to {high:g}, outside [0, 1] (divide 8-bit values by 255)")
    return values.to(torch.float32)


@dataclass(frozen=True)
class ServedModel:
    """What every answer repeats about the model that computed it."""
    eps: tuple[float, ...]
    lipschitz_bound: float
    weights_sha256: str


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinities: null, and certified_at says what holds


def answers(prediction: torch.Tensor, logits: torch.Tensor, radius: torch.Tensor, certified: torch.Tensor,
            served: ServedModel) -> list[dict]:
    """One JSON-ready answer per sample. `certified` is (B, len(eps)) bool: radius > eps, strictly.
    certified_radius is null when the radius is not finite: -inf (not even the prediction is guaranteed,
    certified_at all false) or, for a model whose classes all share one head row, +inf."""
    from lipnext_scale.eps import format_eps

    labels = [format_eps(e) for e in served.eps]
    out = []
    for pred, scores, r, flags in zip(prediction.tolist(), logits.tolist(), radius.tolist(), certified.tolist()):
        out.append({"label": int(pred), "scores": scores, "certified_radius": _finite_or_none(float(r)),
                    "certified_at": dict(zip(labels, (bool(f) for f in flags))),
                    "lipschitz_bound": served.lipschitz_bound, "weights_sha256": served.weights_sha256})
    return out
