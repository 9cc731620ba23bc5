"""TensorBoard scalars under the run's storage (`{run}/tensorboard`), for any fsspec URL.

Local storage: events are written in place. Remote storage (s3://, gs://, ...): events are written to a
local directory and uploaded (`sync()`, called at every checkpoint and at the end), since TensorBoard's
writer appends to files, which object stores cannot do.
"""

from __future__ import annotations

import tempfile

from lipnext_scale.storage import atomic_write_bytes, join_url, list_dir, local_path, makedirs, read_bytes


class ScalarLog:
    """A SummaryWriter for rank 0; every method is a no-op elsewhere (pass enabled=False)."""

    def __init__(self, url: str, enabled: bool = True):
        self.url, self.enabled = url.rstrip("/"), enabled
        self.writer = None
        self._staging = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        local = local_path(self.url)
        if local is None:
            self._staging = tempfile.mkdtemp(prefix="lipnext-tb-")
            local = self._staging
        makedirs(local)
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
            for entry in list_dir(self._staging):
                atomic_write_bytes(join_url(self.url, entry.name), read_bytes(entry.url))

    def close(self) -> None:
        if self.writer is None:
            return
        self.sync()
        self.writer.close()
        self.writer = None
