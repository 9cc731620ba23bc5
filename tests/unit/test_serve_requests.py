"""`lipnext serve`'s request decoding and answers, as pure functions: every bad body is a 4xx with one line,
a good one is exactly the tensor certification reads from a shard."""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lipnext_scale.data.transforms import decode_image, to_float_chw
from lipnext_scale.serve.requests import (
    BadRequest, ServedModel, answers, decode_request, max_request_bytes,
)

SIZE = 8


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def pixels():
    return np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt, content_type", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("PNG", None),
                                               ("PNG", "application/x-www-form-urlencoded")])
def test_an_image_decodes_as_certification_reads_it(pixels, fmt, content_type):
    data = _encoded(pixels, fmt)
    image = decode_request(data, content_type, SIZE)
    assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE)
    assert torch.equal(image, to_float_chw(decode_image(data)))


def test_a_grayscale_png_becomes_rgb_as_in_shards():
    data = _encoded(np.full((SIZE, SIZE), 200, dtype=np.uint8), "PNG")
    image = decode_request(data, "image/png", SIZE)
    assert image.shape == (3, SIZE, SIZE) and torch.all(image == 200 / 255)


def test_a_json_array_is_taken_as_fp32(pixels):
    values = torch.from_numpy(pixels).permute(2, 0, 1).double() / 255
    image = decode_request(json.dumps(values.tolist()).encode(), "application/json; charset=utf-8", SIZE)
    assert torch.equal(image, values.float())
    assert torch.equal(decode_request(json.dumps(values.tolist()).encode(), None, SIZE), values.float())


def _json(shape, value=0.5) -> bytes:
    return json.dumps(np.full(shape, value).tolist()).encode()


@pytest.mark.parametrize("body, content_type, status, reason", [
    (lambda: _encoded(np.zeros((SIZE, SIZE + 1, 3), np.uint8), "PNG"), "image/png", 422, f"image is {SIZE + 1}x{SIZE}"),
    (lambda: _encoded(np.zeros((SIZE, SIZE, 3), np.uint8), "GIF"), "image/png", 415, "a GIF image"),
    (lambda: _encoded(np.arange(SIZE * SIZE * 3, dtype=np.uint8).reshape(SIZE, SIZE, 3) * 37, "PNG")[:80],
     "image/png", 400, "PNG undecodable image"),
    (lambda: b"hello", "image/png", 400, "not an image"),
    (lambda: b"", None, 400, "empty body"),
    (lambda: b"{}", "text/html", 415, "not accepted"),
    (lambda: b"[NaN]", None, 422, "NaN"),
    (lambda: b"[-Infinity]", None, 422, "-Infinity"),
    (lambda: _json((3, SIZE, SIZE)).replace(b"0.5", b"1e400", 1), None, 422, "infinite"),
    (lambda: _json((3, SIZE, SIZE), 1.5), None, 422, "outside [0, 1]"),
    (lambda: _json((3, SIZE, SIZE), -0.1), None, 422, "outside [0, 1]"),
    (lambda: _json((SIZE, SIZE, 3)), None, 422, f"shape ({SIZE}, {SIZE}, 3)"),
    (lambda: b'[["a"]]', None, 422, "array of numbers"),
    (lambda: b"[[1], [1, 2]]", None, 422, "array of numbers"),
    (lambda: b'{"image": []}', "application/json", 422, "got a JSON dict"),
    (lambda: b"[1,", None, 400, "not valid JSON"),
    (lambda: b"[" * 5000, None, 400, "not valid JSON"),
    (lambda: b"\xff\xfe[", "application/json", 400, "not valid JSON"),
    (lambda: b"0" * (max_request_bytes(SIZE) + 1), None, 413, "is over the"),
])
def test_bad_bodies_are_4xx_with_one_line(body, content_type, status, reason):
    with pytest.raises(BadRequest) as e:
        decode_request(body(), content_type, SIZE)
    assert e.value.status == status and reason in e.value.reason and "\n" not in e.value.reason


def test_a_decompression_bomb_header_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # PIL refuses above twice this, from the header
    with pytest.raises(BadRequest) as e:
        decode_request(_encoded(np.zeros((SIZE, SIZE, 3), np.uint8), "PNG"), "image/png", SIZE)
    assert e.value.status == 413


def test_answers_are_strict_json_with_exact_radii():
    served = ServedModel(eps=(36 / 255, 0.5), lipschitz_bound=1.0000001, weights_sha256="ab" * 32)
    radius = torch.tensor([0.3, -math.inf, 0.5], dtype=torch.float64)
    certified = radius[:, None] > torch.tensor(served.eps, dtype=torch.float64)[None]
    out = answers(torch.tensor([2, 0, 1]), torch.randn(3, 4, dtype=torch.float64), radius, certified, served)
    json.dumps(out, allow_nan=False)  # what the server sends
    assert out[0]["label"] == 2 and out[0]["certified_radius"] == 0.3
    assert out[0]["certified_at"] == {"36/255": True, "0.5": False}
    assert out[1]["certified_radius"] is None and not any(out[1]["certified_at"].values())
    assert out[2]["certified_at"]["0.5"] is False  # strict: radius == eps is not certified
    assert out[2]["weights_sha256"] == "ab" * 32 and out[2]["lipschitz_bound"] == 1.0000001
