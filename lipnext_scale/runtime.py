"""Process-level set-up: the one `ray.init` of the library, and what the console of a run shows.

`connect_ray` is how every entry point and job joins Ray (`lipnext train/certify/serve/demo/prep`, the
trainer, the certification job, data prep): endpoints on 127.0.0.1, RAY_ADDRESS read here and nowhere
else in the library, the auth token made private. `quiet_console` is set by the `lipnext` console
script before Ray is imported: the lines of Ray, Ray Train and DeepSpeed that ask nothing of the user stay
in Ray's log folder (`/tmp/ray/session_latest/logs`) instead of the console. A leaf: imports no other
module of the package.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Lines forwarded from Ray's processes that are not for the user of a successful run (regular expressions,
# matched anywhere in a line). Each stays in the worker's log file under Ray's log folder.
CONSOLE_NOISE = (
    # Ray Train's preemption watcher actor (created by Ray Train's controller, restartable, with its
    # constructor arguments in the object store): Ray's core worker logs it at ERROR every start.
    r"has constructor arguments in the object store and max_restarts > 0",
    # DeepSpeed on our manifold optimizer, which DeepSpeed has not tested (our tests do)
    r"You are using ZeRO with an untested optimizer",
    # DeepSpeed's CPU accelerator reporting its JIT-built communication op, once per worker
    r"DeepSpeed \S+ built successfully",
)

# Ray's notice, in this process, that a new local instance has token authentication on (its default, which we
# keep: `connect_ray` makes the token private). Ray's warning that it is off stays.
TOKEN_AUTH_NOTICE = ("ray._private.authentication.authentication_token_setup",
                     "Token authentication is enabled for this Ray cluster")


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_console() -> None:
    """Keep CONSOLE_NOISE off the console (Ray's RAY_DEDUP_LOGS_SKIP_REGEX, read when Ray is imported, so
    call it first; a value the user set is kept) and Ray's TOKEN_AUTH_NOTICE."""
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(f"(?:{p})" for p in CONSOLE_NOISE))
    logger_name, text = TOKEN_AUTH_NOTICE
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(text))


def connect_ray(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool | None = None,
                log_to_driver: bool = True):
    """Join Ray unless this process already has: `address` (a cluster, or "local" for a new instance of this
    process only), else RAY_ADDRESS (set by `ray job submit`), else what `ray.init()` finds or starts.
    `num_cpus` sizes a new local instance (ignored when joining a cluster); `dashboard` None is Ray's default;
    `log_to_driver` forwards the workers' output (progress bars, warnings) to this console. Returns Ray's
    context (its `dashboard_url`), or None when Ray was already initialised."""
    import ray

    if ray.is_initialized():
        return None
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None  # what ray.init does; here to know if it joins
    joins_cluster = address not in (None, "local")
    context = ray.init(address=address, num_cpus=None if joins_cluster else num_cpus, include_dashboard=dashboard,
                       dashboard_host="127.0.0.1", log_to_driver=log_to_driver)
    restrict_token_file(Path.home() / ".ray" / "auth_token")
    return context


def restrict_token_file(path: Path) -> bool:
    """Ray 2.60 writes its auth token readable by every local user; the token lets its holder run code on
    the instance, so it is made owner-only (0600). Returns True if the mode was changed."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return False  # no token file: auth disabled, or the token comes from RAY_AUTH_TOKEN
    if mode & 0o077 == 0:
        return False
    path.chmod(0o600)
    print(f"[lipnext] {path} was readable by other users (mode {mode:o}); restricted it to you (0600)")
    return True
