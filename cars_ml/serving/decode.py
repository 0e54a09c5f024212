"""Turn base64 request values into model-ready pixels, refusing hostile input with a clear message.

Pure PIL + numpy (no TensorFlow, no MLflow) so the decoder can be tested and fuzzed on its own.
Every problem raises :class:`RequestError` (a ``ValueError``) whose message names the problem,
the offending image's index and the fix; the pyfunc model turns it into an HTTP 400.

Resizing note: images are resized to ``(s, s)`` with PIL ``BILINEAR`` and ``reducing_gap=None``.
PIL widens the bilinear kernel when downscaling, so this is an antialiased triangle filter like
the training pipeline's ``tf.image.resize(..., antialias=True)``. On the three sample photos
(224 px to 96 or 32 px) the two differ by at most 1 grey level (mean 0.13), not bit for bit.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import threading
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
from PIL import Image, UnidentifiedImageError

from cars_ml.serving.limits import (  # noqa: F401  (re-exported)
    LIMITS_ENV_PREFIX,
    Limits,
    limits_from_env,
)

# Formats we let PIL try. Restricting the list keeps rarely used (and historically buggy)
# decoders such as TIFF, PSD or EPS away from untrusted bytes.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(;[\w.+-]+=[\w.+-]+)*(?P<b64>;base64)?,", re.IGNORECASE
)
_WHITESPACE = re.compile(r"\s+")
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/\-_]*={0,2}$")


class RequestError(ValueError):
    """A bad request value; the message is safe to return to the client (HTTP 400)."""

    def __init__(self, message: str, index: int | None = None):
        self.index = index
        prefix = f"image {index}: " if index is not None else ""
        super().__init__(prefix + message)
        self.reason = message


# Bytes per pixel of PIL's image buffers (RGB is stored in 4 bytes a pixel).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}
# Peak memory of decoding one image, in frames of its buffer: the frame, the box-reduced copy and
# the codec's own buffers. Measured per format on 40-megapixel images (docs/serving.md); libwebp
# decodes into a buffer of its own that Pillow then copies, twice.
_FRAMES = {"WEBP": 4.0}
_DEFAULT_FRAMES = 2.0


# JPEG scans (SOS markers) accepted in one file: a baseline JPEG has one per colour component
# and common progressive encoders write about ten, while each scan can make the decoder walk the
# whole image again, so a small file with thousands of scans costs far more than its size.
MAX_JPEG_SCANS = 32
# Pillow decodes run-length BMP in a Python loop, slow per byte of a tiny file.
_BMP_RLE = (1, 2)


def refuse_costly(image: Image.Image, raw: bytes) -> None:
    """Refuse encodings whose decoding work is not bounded by the image's declared pixels."""
    if image.format == "BMP" and image.info.get("compression") in _BMP_RLE:
        raise RequestError(
            "run-length compressed BMP is not accepted (its decoding is slow per byte); "
            "send PNG, JPEG or uncompressed BMP."
        )
    if image.format == "JPEG":
        # Entropy-coded data escapes 0xFF as 0xFF00, so FFDA appears only as a marker.
        scans = raw.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise RequestError(
                f"JPEG with {scans} scans, more than {MAX_JPEG_SCANS} (each scan can cost a "
                "pass over the whole image); re-save it as a baseline or standard progressive JPEG."
            )


class RequestAllowance:
    """What one request's images may cost in all: declared pixels and decoding time."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.pixels = 0
        self.started = time.monotonic()

    def charge(self, pixels: int) -> None:
        """Count an image's declared pixels before it is decoded."""
        self.pixels += pixels
        if self.pixels > self.limits.max_request_pixels:
            raise RequestError(
                f"the request's images declare {self.pixels} pixels in all, over "
                f"max_request_pixels={self.limits.max_request_pixels}; send fewer or smaller "
                "images per request."
            )

    def check_time(self) -> None:
        elapsed = time.monotonic() - self.started
        if elapsed > self.limits.decode_time_s:
            raise RequestError(
                f"decoding this request's images took {elapsed:.1f} s, over "
                f"decode_time_s={self.limits.decode_time_s:g}; send fewer or smaller images."
            )


def decode_cost(image: Image.Image) -> int:
    """Estimated peak bytes of decoding ``image`` (opened, after any draft, not yet loaded)."""
    width, height = image.size
    frames = _FRAMES.get(str(image.format), _DEFAULT_FRAMES)
    return int(width * height * _BYTES_PER_PIXEL.get(image.mode, 4) * frames)


class DecodeBudget:
    """Memory for image decodes shared by a server's threads: a decode waits until its
    estimated cost fits beside the ones running; one larger than the budget runs alone."""

    def __init__(self, megabytes: int):
        self.capacity = int(megabytes) * 2**20
        self.in_use = 0
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int):
        with self._changed:
            self._changed.wait_for(
                lambda: self.in_use == 0 or self.in_use + nbytes <= self.capacity
            )
            self.in_use += nbytes
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= nbytes
                self._changed.notify_all()


def _strip_data_url(text: str) -> str:
    match = _DATA_URL.match(text)
    if not match:
        return text
    if not match.group("b64"):
        raise RequestError(
            "data URL is not base64-encoded; send 'data:image/jpeg;base64,<base64>' or plain base64."
        )
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise RequestError(
            f"data URL has media type {mime!r}; send an image (image/jpeg, image/png)."
        )
    return text[match.end() :]


def _too_big(size: int, max_bytes: int) -> str:
    return (
        f"image is {size} bytes, over the limit of {max_bytes} bytes (max_image_bytes); "
        "downscale or recompress it before sending."
    )


def _b64_to_bytes(value: object, max_bytes: int) -> bytes:
    if not isinstance(value, str):
        raise RequestError(
            f"expected a base64-encoded image string, got {type(value).__name__}; "
            "base64-encode the JPEG or PNG file bytes."
        )
    text = _WHITESPACE.sub("", _strip_data_url(value.strip()))
    if not text:
        raise RequestError("empty image string; send the base64-encoded JPEG or PNG file bytes.")
    # Refuse by length before decoding: base64 carries 3 bytes per 4 characters, so for valid
    # base64 this estimate is the exact decoded size.
    estimate = len(text) * 3 // 4 - text[-2:].count("=")
    if estimate > max_bytes:
        raise RequestError(_too_big(estimate, max_bytes))
    if not _BASE64_CHARS.match(text) or len(text) % 4 == 1:
        raise RequestError(
            "invalid base64: the value contains characters outside the base64 alphabet or has a "
            "wrong length; send base64.b64encode(file_bytes).decode('ascii')."
        )
    # Accept the URL-safe alphabet and missing padding, both common in JavaScript clients.
    text = text.replace("-", "+").replace("_", "/").rstrip("=")
    text += "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(
            f"invalid base64 ({exc}); send standard base64 of the file bytes."
        ) from exc
    if not raw:
        raise RequestError("empty image: the base64 decodes to zero bytes.")
    if len(raw) > max_bytes:
        raise RequestError(_too_big(len(raw), max_bytes))
    return raw


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels are composited on white, 16-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's own I;16 -> L conversion clips at 255 instead of scaling, washing images out.
        # This runs on the shrunk image, so the float copy is small.
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


# EXIF orientation -> the transpose that makes the image upright (what ImageOps.exif_transpose
# applies); read before shrinking, because the shrunk copy carries no EXIF block.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """The EXIF transpose to apply; a mangled EXIF block is ignored rather than fatal."""
    try:
        return _ORIENTATION.get(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 -- PIL raises many types for broken EXIF; pixels are fine.
        return None


def _shrink(image: Image.Image, target: int) -> Image.Image:
    """Box-reduce a decoded image in its own mode so its short side keeps >= 2x ``target``.

    Colour conversion, alpha compositing and EXIF rotation then work on the small copy, so a
    40-megapixel image never passes through a second full-size buffer. ``reduce`` cannot average
    palette indices, so palette and 1-bit images are first sampled (nearest) down to twice the
    final size and expanded there; 16-bit greys use ``resize``.
    """
    factor = min(image.size) // (2 * target)
    if factor < 2:
        return image
    if image.mode in ("P", "1"):
        if factor >= 4:
            size = (max(1, image.width * 2 // factor), max(1, image.height * 2 // factor))
            image = image.resize(size, Image.Resampling.NEAREST)
            factor = 2
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    if image.mode.startswith("I;16"):
        size = (max(1, image.width // factor), max(1, image.height // factor))
        return image.resize(size, Image.Resampling.BOX)
    return image.reduce(factor)


def decode_image_bytes(
    raw: bytes,
    *,
    max_pixels: int,
    target_size: int | None = None,
    budget: DecodeBudget | None = None,
    work: RequestAllowance | None = None,
) -> Image.Image:
    """Decode image file bytes into an upright RGB PIL image, checking dimensions first.

    With ``target_size`` (the model's input size) a large image is decoded reduced: JPEG in
    draft mode (the codec's own DCT scaling, never below twice the target), other formats
    box-reduced right after decoding. Peak memory is then one decoded frame, not several, and
    with a ``budget`` the decode waits until its estimated cost fits (:class:`DecodeBudget`).
    """
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the limit; PIL's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width <= 0 or height <= 0:
                raise RequestError(f"image has an empty size {width}x{height}.")
            if width * height > max_pixels:
                raise RequestError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} pixels (decompression bomb protection); downscale it first."
                )
            refuse_costly(image, raw)
            if target_size and image.format == "JPEG":
                image.draft(None, (2 * target_size, 2 * target_size))
            if work is not None:
                # After the draft: a JPEG costs the pixels its codec produces at the reduced scale.
                work.charge(image.width * image.height)
            with budget.reserve(decode_cost(image)) if budget else nullcontext():
                image.load()
                transpose = _orientation(image)
                if target_size:
                    image = _shrink(image, target_size)
                image = _to_rgb(image)
            return image.transpose(transpose) if transpose is not None else image
    except RequestError:
        raise
    except Image.DecompressionBombError as exc:
        raise RequestError(
            f"image is too large to decode safely ({exc}); downscale it first."
        ) from exc
    except UnidentifiedImageError as exc:
        raise RequestError(
            "not an image or an unsupported format; send JPEG, PNG, WEBP, BMP or GIF bytes "
            f"(allowed formats: {', '.join(ALLOWED_FORMATS)})."
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        # PIL reports truncated or corrupt pixel data with any of these, depending on the codec.
        raise RequestError(
            f"truncated or corrupt image data ({type(exc).__name__}: {exc})."
        ) from exc


def decode_base64_image(
    value: object,
    *,
    max_bytes: int,
    max_pixels: int,
    target_size: int | None = None,
    budget: DecodeBudget | None = None,
    work: RequestAllowance | None = None,
) -> Image.Image:
    """Decode one base64 (or ``data:image/...;base64,``) string into an RGB PIL image."""
    raw = _b64_to_bytes(value, max_bytes)
    return decode_image_bytes(
        raw, max_pixels=max_pixels, target_size=target_size, budget=budget, work=work
    )


def resize_rgb(image: Image.Image, image_size: int) -> np.ndarray:
    """Resize to ``(s, s)`` with antialiased bilinear and return uint8 ``(s, s, 3)``."""
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


def prepare_batch(
    values: Sequence[object],
    image_size: int,
    limits: Limits,
    budget: DecodeBudget | None = None,
) -> np.ndarray:
    """Decode and resize every value into one uint8 array ``(n, s, s, 3)``.

    Images are decoded one at a time and only the resized pixels are kept, so peak memory is one
    decoded frame plus the batch. ``budget`` (shared by the server's threads) bounds the memory
    of the decodes running at once server-wide.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RequestError(f"expected a list of base64 image strings, got {type(values).__name__}.")
    if len(values) == 0:
        raise RequestError("empty request: no images; send at least one base64 image in 'image'.")
    if len(values) > limits.max_images_per_request:
        raise RequestError(
            f"too many images in one request: {len(values)} > max_images_per_request="
            f"{limits.max_images_per_request}; split it into several requests."
        )
    out = np.empty((len(values), image_size, image_size, 3), dtype=np.uint8)
    work = RequestAllowance(limits)
    for index, value in enumerate(values):
        try:
            work.check_time()
            image = decode_base64_image(
                value,
                max_bytes=limits.max_image_bytes,
                max_pixels=limits.max_pixels,
                target_size=image_size,
                budget=budget,
                work=work,
            )
            out[index] = resize_rgb(image, image_size)
        except RequestError as exc:
            raise RequestError(exc.reason, index=index) from exc
    return out
