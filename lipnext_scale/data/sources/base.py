"""What a source layout lists: samples with a deterministic key, a label and a lazy reference to the bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from lipnext_scale.data.urls import DataError, url_to_fs


@dataclass(frozen=True)
class FileRef:
    """A whole file (an extracted JPEG)."""
    url: str

    def read(self) -> bytes:
        fs, path = url_to_fs(self.url)
        with fs.open(path, "rb") as f:
            return f.read()


@dataclass(frozen=True)
class TarMemberRef:
    """A member's bytes inside an (uncompressed, possibly nested) tar archive, read by seek: no unpacking."""
    url: str
    offset: int
    size: int

    def read(self) -> bytes:
        fs, path = url_to_fs(self.url)
        with fs.open(path, "rb") as f:
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
    key: str          # unique, deterministic, no dots (WebDataset splits member names at the first dot)
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
    notes: list[str] = field(default_factory=list)


def safe_key(text: str) -> str:
    return text.replace(".", "_").replace("/", "_").replace(" ", "_")


def require_dir(url: str, what: str) -> None:
    fs, path = url_to_fs(url)
    if not fs.isdir(path):
        raise DataError(f"{what}: {url!r} is not a directory")
