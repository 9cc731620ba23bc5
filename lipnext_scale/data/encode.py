"""Source image -> stored image: RGB, short side = image_size (aspect kept), JPEG (or lossless PNG).

Handles the quirks of real ImageNet files: CMYK and grayscale JPEGs, a PNG stored under a .JPEG
name (decoded by content, never by extension). An RGB JPEG whose short side already matches is
copied byte for byte, so re-running prep on prepared-size images loses nothing to re-encoding.
"""

from __future__ import annotations

import io

from PIL import Image

from lipnext_scale.data.transforms import SampleError


def encode_image(raw: bytes | Image.Image, image_size: int, fmt: str, quality: int):
    """-> (bytes, member extension, original (width, height), original format)."""
    try:
        img = Image.open(io.BytesIO(raw)) if isinstance(raw, (bytes, bytearray)) else raw
        orig_size, orig_format = img.size, (img.format or "array")
        if min(orig_size) < 1:
            raise SampleError(f"empty image {orig_size}")
        if (fmt == "jpg" and orig_format == "JPEG" and img.mode == "RGB" and min(orig_size) == image_size
                and isinstance(raw, (bytes, bytearray))):
            return bytes(raw), "jpg", orig_size, orig_format
        if orig_format == "JPEG":
            # DCT-domain downscale (1/2, 1/4, 1/8) while keeping the short side >= image_size: faster
            # decode, and the final resize below still sets the exact size.
            scale = image_size / min(orig_size)
            img.draft(img.mode, (max(1, int(orig_size[0] * scale)), max(1, int(orig_size[1] * scale))))
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")  # CMYK (Adobe-inverted handled by PIL), L, P, RGBA, I;16 ...
        w, h = img.size
        s = image_size / min(w, h)
        if (w, h) != (round(w * s), round(h * s)):
            img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        if fmt == "png":
            img.save(out, format="PNG")
        else:
            img.save(out, format="JPEG", quality=quality)
        return out.getvalue(), fmt, orig_size, orig_format
    except SampleError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise SampleError(f"undecodable source image ({type(e).__name__}: {e})") from e
