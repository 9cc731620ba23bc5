"""`lipnext serve` for real: the CLI in a process of its own (its own local Ray, Serve's HTTP proxy, one
replica of lipnext-tiny), real HTTP requests from urllib, and the answers compared with `lipnext certify`'s
job on the same images: the same label and the same radius, bit for bit (the float64 samples.parquet holds).
Bad requests get a 4xx with a one-line reason."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from lipnext_scale.certify.job import CertifyRuntime, certify_job
from lipnext_scale.ckpt import save_exported
from lipnext_scale.config import CertifyConfig, JobConfig, config_to_dict
from lipnext_scale.eps import parse_eps_list
from lipnext_scale.model import create_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
EPS = "16/255,36/255,72/255"
TOKEN = "serve-test-token-0123456789abcdef"
IMAGES = 24


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _images() -> dict[str, bytes]:
    """Real handwritten digits (sklearn's, 8x8 upsampled to 32x32 RGB) and a few noise images, as PNG."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:IMAGES - 4]
    rng = np.random.default_rng(0)
    out = {}
    for i, d in enumerate(digits):
        gray = np.kron(d * (255 / 16), np.ones((4, 4))).round().astype(np.uint8)
        out[f"d{i:03d}"] = _png(np.stack([gray] * 3, axis=-1))
    for i in range(4):
        out[f"n{i:03d}"] = _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def certified(tmp_path_factory):
    """(export dir, PNGs by key, the job's samples by key): lipnext-tiny certified by `certify_job`, its
    report copied beside the export (what GET /model shows)."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    save_exported(create_model("lipnext-tiny").state_dict(), config_to_dict(JobConfig()), str(root / "export"))
    images = _images()
    (root / "data").mkdir()
    with wds.TarWriter(str(root / "data" / "val-000000.tar")) as sink:
        for i, (key, png) in enumerate(images.items()):
            sink.write({"__key__": key, "png": png, "cls": str(i % 10).encode()})
    certify_job(str(root / "export"), str(root / "data" / "val"), str(root / "out"),
                CertifyConfig(eps=EPS, actors=0, batch_size=256), CertifyRuntime(progress=False))
    shutil.copy(root / "out" / "report.json", root / "export" / "report.json")
    table = pq.read_table(root / "out" / "samples.parquet").to_pylist()
    return root / "export", images, {row["key"]: row for row in table}


def _request(url, body=None, content_type=None, token=TOKEN, method=None):
    """(status, headers, JSON body) of one HTTP request."""
    headers = {"Content-Type": content_type} if content_type else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


@pytest.fixture(scope="module")
def server(certified, tmp_path_factory):
    """The base URL of `lipnext serve` on the export (own local Ray, 1 replica, token auth), stopped by
    SIGTERM afterwards: it must exit 0 having shut its Ray down."""
    export, _, _ = certified
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lipnext_scale.cli", "serve", str(export), "--port", str(port),
                                 "--eps", EPS, "--token-file", str(token_file), "--max-batch-size", "8",
                                 "--batch-wait-ms", "20"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"lipnext serve exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"lipnext serve did not answer:\n{log.read_text()[-3000:]}"
            if "Ctrl-C stops" in log.read_text():  # printed once every replica has verified its model
                break
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    text = log.read_text()
    assert rc == 0 and "[serve] stopped" in text, text[-3000:]


def test_answers_equal_the_certification_job_bit_for_bit(server, certified):
    _, images, samples = certified
    eps = parse_eps_list(EPS)

    def post(key):
        return key, _request(f"{server}/certify", images[key], "image/png")

    with ThreadPoolExecutor(8) as pool:  # concurrent requests, so Serve forms batches of several
        answers = dict(pool.map(post, sorted(images)))
    batch_sizes = set()
    for key, (status, headers, answer) in answers.items():
        assert status == 200, answer
        row = samples[key]
        assert answer["label"] == row["prediction"]
        assert answer["certified_radius"] == row["radius"]  # exact float64 equality, not approx
        assert answer["certified_at"] == {label: row["radius"] > e for label, e in zip(EPS.split(","), eps)}
        assert len(answer["scores"]) == 10 and int(np.argmax(answer["scores"])) == answer["label"]
        batch_sizes.add(int(headers["x-lipnext-batch-size"]))
    assert max(batch_sizes) <= 8
    first = answers[sorted(images)[0]][2]
    assert first["lipschitz_bound"] >= 1.0 and len(first["weights_sha256"]) == 64

    # The same image as a JSON array (3, H, W) in [0, 1]: the same certificate.
    key = sorted(images)[3]
    pixels = np.asarray(Image.open(io.BytesIO(images[key])).convert("RGB"), dtype=np.float32) / 255
    body = json.dumps(torch.from_numpy(pixels).permute(2, 0, 1).tolist()).encode()
    status, _, answer = _request(f"{server}/certify", body, "application/json")
    assert status == 200 and answer["certified_radius"] == samples[key]["radius"]


def test_model_endpoint_describes_the_model_and_its_report(server, certified):
    status, _, model = _request(f"{server}/model")
    assert status == 200
    assert model["model"]["name"] == "lipnext-tiny" and model["input"]["shape"] == [3, 32, 32]
    report = model["certification_report"]["report"]
    assert report["checkpoint"]["weights_sha256"] == model["weights_sha256"]
    assert report["samples"] == IMAGES and model["lipschitz_bound"] == report["lipschitz"]["lipschitz_bound"]


def _noise_png(width, height):
    return _png(np.zeros((height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("body, content_type, status, reason", [
    (_noise_png(40, 32), "image/png", 422, "image is 40x32 but the model takes 32x32"),
    (b"\x89PNG\r\n\x1a\n not really", "image/png", 400, "not an image"),
    (b"GIF89a" + bytes(100), None, 400, "not an image"),
    (b"[[[NaN]]]", "application/json", 422, "NaN"),
    (json.dumps([[[0.5] * 32] * 32] * 3).replace("0.5", "1e999", 1).encode(), "application/json", 422, "infinite"),
    (json.dumps([[[2.0] * 32] * 32] * 3).encode(), "application/json", 422, "outside [0, 1]"),
    (json.dumps([[[0.5] * 32] * 32] * 1).encode(), "application/json", 422, "shape (1, 32, 32)"),
    (b"[1, 2", "application/json", 400, "not valid JSON"),
    (b"[" * 50_000, "application/json", 400, "not valid JSON"),  # nested deeper than any parser goes
    (b"[" * 120_000, "application/json", 413, "is over the"),
    (b"x" * 200_000, "image/png", 413, "is over the"),
    (b"", "image/png", 400, "empty body"),
    (b"abc", "text/csv", 415, "not accepted"),
])
def test_bad_requests_get_a_4xx_with_one_line(server, body, content_type, status, reason):
    got, _, answer = _request(f"{server}/certify", body, content_type)
    assert got == status and reason in answer["error"] and "\n" not in answer["error"], answer


def test_method_route_and_token_are_checked(server, certified):
    _, images, _ = certified
    png = next(iter(images.values()))
    assert _request(f"{server}/certify", png, "image/png", token=None)[0] == 401
    assert _request(f"{server}/certify", png, "image/png", token="wrong-token-of-some-length")[0] == 401
    assert _request(f"{server}/certify", method="GET")[0] == 405
    assert _request(f"{server}/nothing")[0] == 404
