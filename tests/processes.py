"""Processes a test started: stop them by handle, find them by command line. Never by name machine-wide (no
`ray stop`, no pkill): only what this test process started."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM a process started with start_new_session=True (a Ray head, the rehearsal: each shuts down the Ray
    processes it started), then SIGKILL what is left of its process group after `grace` seconds."""
    pgid = proc.pid  # start_new_session=True: it leads its own process group
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def descendants_running(marker: str) -> list:
    """This process's descendants whose command line contains `marker` (a Ray actor's or worker's class name);
    processes that exit or turn zombie meanwhile are skipped. Another xdist worker's processes, and the
    rehearsal's, are never among them."""
    import psutil

    found, stack = [], psutil.Process().children()
    while stack:
        p = stack.pop()
        try:
            stack.extend(p.children())
            if marker in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found
