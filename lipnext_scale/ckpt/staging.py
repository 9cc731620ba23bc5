"""Local staging directories of checkpoint saves: named after the host and process that write them, and swept
once that process has ended.

Every rank writes its part of a checkpoint into a local temporary directory, which Ray Train uploads and then
deletes (`CheckpointManager.save`). A worker killed in between (SIGKILL, the OOM killer, a node agent ending a
preempted worker) leaves its directory behind: at 2B parameters one rank's part of the state is gigabytes, and
an elastic run restarted many times fills the node's temporary disk until a save fails. tempfile cannot know
which directories are abandoned, so the name says who wrote it, `lipnext-ckpt-<host>-<pid>-<random>`, and a
rank starting on that host removes the directories of its host whose process no longer exists (the upload
runs in the writing process, so a directory outlives its use only when that process is gone). Directories of
other hosts (a temporary folder shared between machines) and of processes alive are never touched; a pid
reused by another process keeps its directory until a later start.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile

from lipnext_scale.ckpt.format import CheckpointError
from lipnext_scale.storage import du, is_dir, join_url, list_dir, move, remove

log = logging.getLogger(__name__)

PREFIX = "lipnext-ckpt-"


def _own_prefix() -> str:
    return f"{PREFIX}{socket.gethostname()}-"


def new_staging_dir() -> str:
    """A new, empty staging directory under the temporary folder, named after this host and process."""
    return tempfile.mkdtemp(prefix=f"{_own_prefix()}{os.getpid()}-")


def _writer_pid(name: str) -> int | None:
    """The pid in a staging directory name of this host, or None for any other name."""
    if not name.startswith(_own_prefix()):
        return None
    pid = name[len(_own_prefix()):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def _still_there(url: str) -> bool:
    try:
        return is_dir(url, CheckpointError)
    except CheckpointError:
        return True  # cannot even look: worth the warning


def sweep_orphaned_staging(temp_dir: str | None = None) -> tuple[int, int]:
    """Removes this host's staging directories whose writing process has ended; returns (directories, bytes)
    removed. Never raises: a directory another rank of the host removes first is skipped, one that cannot be
    removed is skipped and logged."""
    root = temp_dir or tempfile.gettempdir()
    removed = freed = 0
    try:
        entries = list_dir(root, CheckpointError)
    except CheckpointError as e:
        log.warning("could not look for abandoned checkpoint staging directories: %s", e)
        return 0, 0
    for entry in entries:
        pid = _writer_pid(entry.name)
        if pid is None or entry.type != "directory" or _alive(pid):
            continue
        # Claimed first by a rename (atomic: of the ranks of this host sweeping at once, one gets each
        # directory); the new name carries this process's pid, so were it killed now, a later sweep finds it.
        claimed = join_url(root, f"{_own_prefix()}{os.getpid()}-swept-{entry.name}")
        try:
            move(entry.url, claimed, CheckpointError)
        except CheckpointError as e:
            if _still_there(entry.url):  # else another rank of this host claimed it first
                log.warning("could not remove the abandoned checkpoint staging directory %s: %s", entry.url, e)
            continue
        try:
            size = du(claimed, CheckpointError)
            remove(claimed, CheckpointError, recursive=True)
        except CheckpointError as e:
            log.warning("could not remove the abandoned checkpoint staging directory %s: %s", claimed, e)
            continue
        removed, freed = removed + 1, freed + size
    if removed:
        log.info("removed %d checkpoint staging director%s (%.1f MB) left in %s by processes that ended "
                 "mid-save", removed, "y" if removed == 1 else "ies", freed / 1e6, root)
    return removed, freed
