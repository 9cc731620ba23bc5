"""TensorBoard scalars under the run's storage (`{run}/tensorboard`), for any fsspec URL.

Local storage: events are written in place. Remote storage (s3://, gs://, ...): events are written to a
local directory and uploaded (`sync()`, called at every checkpoint and at the end), since TensorBoard's
writer appends to files, which object stores cannot do.
"""

from __future__ import annotations

import os
import tempfile

from lipnext_scale.storage import atomic_write_bytes, join_url, url_to_fs


def _local_path(url: str) -> str | None:
    fs, path = url_to_fs(url)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return path if ("file" in protocols or "local" in protocols) else None


class ScalarLog:
    """A SummaryWriter for rank 0; every method is a no-op elsewhere (pass enabled=False)."""

    def __init__(self, url: str, enabled: bool = True):
        self.url, self.enabled = url.rstrip("/"), enabled
        self.writer = None
        self._staging = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        local = _local_path(self.url)
        if local is None:
            self._staging = tempfile.mkdtemp(prefix="lipnext-tb-")
            local = self._staging
        os.makedirs(local, exist_ok=True)
        self.writer = SummaryWriter(log_dir=local)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def sync(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self._staging is not None:  # whole files, each replaced atomically: a reader never sees half of one
            for name in os.listdir(self._staging):
                with open(os.path.join(self._staging, name), "rb") as f:
                    atomic_write_bytes(join_url(self.url, name), f.read())

    def close(self) -> None:
        if self.writer is None:
            return
        self.sync()
        self.writer.close()
        self.writer = None
