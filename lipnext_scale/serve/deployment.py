"""The Ray Serve deployment behind `lipnext serve`, and the loop that runs it until Ctrl-C.

Each replica holds one `certify.worker.ShardCertifier`: the model loaded, its hash checked against the
one the driver verified, verified again (the rigorous Lipschitz bound, `verify_model`), its pair distances
and floating-point model computed once, exactly as each `lipnext certify` actor does. Requests are
validated one by one (`requests.decode_request`: a bad one never reaches a batch), then gathered by
Serve's dynamic batching (`@serve.batch`): one forward per batch through `certify.worker.certify_logits`,
the code path of the job's radii. A sample's radius does not depend on the batch it landed in (float64
head per sample, `head_logits64`), so with the same torch thread count as the job's workers (1 by
default in both) the answers equal `lipnext certify`'s numbers bit for bit.

Serve's HTTP proxy has no authentication of its own (Ray's token auth covers the dashboard, the Jobs API
and Ray's RPCs, not Serve's ingress), so an optional bearer token is checked here, in the replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import signal
import time
from dataclasses import dataclass, field

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lipnext_scale.certify.certify import certified_mask
from lipnext_scale.certify.worker import CertifierProcess, Checks, ShardCertifier, certify_logits
from lipnext_scale.errors import LipnextError
from lipnext_scale.serve.requests import BadRequest, ServedModel, answers, check_length, decode_request

APP_NAME = "lipnext"
BATCH_SIZE_HEADER = "x-lipnext-batch-size"  # how many requests shared this answer's forward (bench/)


@dataclass(frozen=True)
class ServeSettings:
    """Everything a replica needs; the driver fills it after verifying the weights itself."""
    ckpt_url: str                   # the very checkpoint verified (a run directory resolved to its step)
    weights_sha256: str             # what each replica must load, or it refuses to start
    eps: tuple[float, ...]
    lipschitz_tol: float
    allow_approx: bool
    description: dict = field(default_factory=dict)  # GET /model
    device: str = "cpu"
    threads: int = 1                # torch threads per replica (the job's --threads-per-worker default)
    max_batch_size: int = 32
    batch_wait_s: float = 0.005
    token_sha256: str | None = None  # bearer token's sha256; the token itself never leaves the driver


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class CertifyServer:
    """POST /certify: one image -> its certificate. GET /model: the model and its report."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.certifier = ShardCertifier(settings.ckpt_url, Checks(list(settings.eps)),
                                        batch_size=settings.max_batch_size, lipschitz_tol=settings.lipschitz_tol,
                                        allow_approx=settings.allow_approx, expected_sha256=settings.weights_sha256,
                                        process=CertifierProcess(settings.device, settings.threads, own_process=True))
        self.image_size = self.certifier.image_size
        self.served = ServedModel(settings.eps, self.certifier.verification.lipschitz_bound,
                                  self.certifier.loaded.weights_sha256)
        self.certify_images.set_max_batch_size(settings.max_batch_size)
        self.certify_images.set_batch_wait_timeout_s(settings.batch_wait_s)

    async def __call__(self, request: Request) -> Response:
        try:
            self._authorize(request)
            path = request.url.path.rstrip("/") or "/"
            if path == "/model":
                self._method(request, "GET")
                return JSONResponse(self.settings.description)
            if path == "/certify":
                self._method(request, "POST")
                length = request.headers.get("content-length", "")
                if length.isdigit():  # refuse before reading a body announced too large
                    check_length(int(length), self.image_size)
                image = decode_request(await request.body(), request.headers.get("content-type"), self.image_size)
                answer, batch_size = await self.certify_images(image)
                return JSONResponse(answer, headers={BATCH_SIZE_HEADER: str(batch_size)})
            raise BadRequest(404, f"no such endpoint {path!r}: POST /certify (an image) or GET /model")
        except BadRequest as e:
            headers = {"www-authenticate": "Bearer"} if e.status == 401 else None
            return JSONResponse({"error": e.reason}, status_code=e.status, headers=headers)

    def _authorize(self, request: Request) -> None:
        expected = self.settings.token_sha256
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_sha256(token.strip()), expected):
            raise BadRequest(401, "missing or wrong token: send 'Authorization: Bearer <token>' (lipnext serve "
                                  "--token-file)")

    @staticmethod
    def _method(request: Request, allowed: str) -> None:
        if request.method != allowed:
            raise BadRequest(405, f"{request.method} {request.url.path}: use {allowed}")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # set from the settings in __init__
    async def certify_images(self, images: list[torch.Tensor]) -> list[tuple[dict, int]]:
        # The forward runs off the event loop, so requests keep being read and validated meanwhile.
        return await asyncio.to_thread(self._certify, images)

    def _certify(self, images: list[torch.Tensor]) -> list[tuple[dict, int]]:
        c = self.certifier
        out = certify_logits(c.loaded.model, torch.stack(images).to(c.device), c.verification.lipschitz_used,
                             c.pair_distances, c.fp_model)
        pred = out["prediction"]
        certified = certified_mask(pred, out["radius"], pred, list(self.settings.eps))  # radius > eps
        batch = answers(pred, out["logits"], out["radius"], certified, self.served)
        return [(a, len(images)) for a in batch]


def build_app(settings: ServeSettings, replicas: int):
    """The Serve application: `replicas` copies of the model, each with settings.threads CPUs (or a GPU)."""
    gpu = str(settings.device).startswith("cuda")
    deployment = serve.deployment(CertifyServer, name="CertifyServer").options(
        num_replicas=replicas, max_ongoing_requests=2 * settings.max_batch_size,
        ray_actor_options={"num_cpus": settings.threads, "num_gpus": 1 if gpu else 0})
    return deployment.bind(settings)


def _one_line(error: Exception) -> str:
    """The replica's own error (a CertifyError naming the checkpoint) out of Serve's multi-line report."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "CertifyError" in line or "CertifyRefused" in line:
            return line.split(": ", 1)[-1]
    return lines[0] if lines else type(error).__name__


class ServeStartError(LipnextError, RuntimeError):
    """Serve could not start the application; the message is one line."""


def start(settings: ServeSettings, replicas: int, host: str, port: int) -> None:
    """Start Serve's HTTP proxy on host:port (this Ray cluster's head) and the application; returns once
    every replica has loaded and verified the model."""
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    try:
        serve.run(build_app(settings, replicas), name=APP_NAME, route_prefix="/")
    except Exception as e:  # Serve reports a replica's failure as a RuntimeError with its traceback
        raise ServeStartError(f"a serving replica failed to start: {_one_line(e)}") from None


def stop_on_sigterm() -> None:
    """SIGTERM (and SIGINT) raise KeyboardInterrupt from here on, so a stop while Serve is still starting
    is as clean as one while it serves. Called after ray.init, whose own handler would abort the process."""
    def interrupt(*_):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)


def wait_forever() -> None:
    while True:
        time.sleep(3600)


def shut_down(owns_ray: bool) -> None:
    """Remove what `start` deployed; on a Ray instance this process started, shut Serve and Ray down."""
    import ray

    if not ray.is_initialized():
        return
    if owns_ray:
        serve.shutdown()
        ray.shutdown()
    else:  # a shared cluster: other applications may be served there
        serve.delete(APP_NAME)
