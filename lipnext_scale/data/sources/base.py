"""What a source layout lists: samples with a deterministic key, a label and a lazy reference to the bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

from PIL import Image

from lipnext_scale.data.errors import DataError
from lipnext_scale.storage import open_url, read_bytes


@dataclass(frozen=True)
class FileRef:
    """A whole file (an extracted JPEG)."""
    url: str

    def read(self) -> bytes:
        return read_bytes(self.url, DataError)


@dataclass(frozen=True)
class TarMemberRef:
    """A member's bytes inside an (uncompressed, possibly nested) tar archive, read by seek: no unpacking."""
    url: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open_url(self.url, "rb", DataError) as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"archive {self.url} ends inside a member (offset {self.offset}, size {self.size})")
        return data


@dataclass(frozen=True)
class PixelsRef:
    """Raw uint8 pixels (HWC RGB, or HW grayscale when channels == 1) from an array data set."""
    height: int
    width: int
    channels: int
    data: bytes

    def read(self) -> Image.Image:
        mode = "RGB" if self.channels == 3 else "L"
        return Image.frombytes(mode, (self.width, self.height), self.data)


@dataclass(frozen=True)
class SourceSample:
    key: str          # unique in its split, deterministic, no dots (WebDataset splits member names at the first dot)
    label: int        # index of the class id in `SourcePlan.classes`
    origin: str       # original file name (or array index), recorded in the sample's .json
    ref: FileRef | TarMemberRef | PixelsRef


@dataclass
class SourcePlan:
    kind: str
    classes: list[str]                      # class ids in label order (sorted wnids for ImageNet)
    splits: dict[str, list[SourceSample]]
    image_format: str = "jpg"               # what prep stores: jpg, or png (lossless) for tiny arrays
    names: list[str] | None = None          # human-readable class names, when the source has them
    default_image_size: int = 256
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (origin, reason) found while listing


def safe_key(text: str) -> str:
    """A sample key for `text` (a file name without its extension): injective, so two source files never
    share a key (two samples would merge into one while the manifest counted both). Percent-encoding
    (RFC 3986, `%` itself escaped) keeps letters, digits and `_-~` as they are (ImageNet's names come
    through unchanged) and escapes `.` too, where WebDataset splits a member name into key and extension."""
    return quote(text, safe="").replace(".", "%2E")


def check_unique_keys(plan: SourcePlan) -> None:
    """Keys must be unique within a split (e.g. `a.JPEG` and `a.png` in one folder both give key `a`)."""
    for split, samples in plan.splits.items():
        seen: dict[str, str] = {}
        for s in samples:
            if s.key in seen:
                raise DataError(f"{plan.kind} {split}: {seen[s.key]!r} and {s.origin!r} both give sample key "
                                f"{s.key!r} (keys are file names without extension); rename one of them")
            seen[s.key] = s.origin
