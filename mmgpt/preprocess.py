"""Decoding what users send: encoded image and audio files -> model inputs, with limits.

Shared by `mmgpt ask`, training and the Triton models, so every path sees the same pixels and samples.
Every failure is an `InputError` whose message names the problem and what to do.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000  # Whisper's


class InputError(ValueError):
    """A user input that cannot be used; the message is shown to the user as is."""


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # ~6300x6300: above this Pillow's lazy header is refused (decompression bombs)
    max_audio_bytes: int = 50 * 1024 * 1024
    max_audio_seconds: float = 30.0  # one Whisper window


# ---------------------------------------------------------------------------------------------- images
def load_image(data: bytes, limits: Limits = Limits()):
    """Encoded JPEG/PNG/WebP/BMP/... bytes -> RGB PIL image. Transparent images are put on white."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise InputError(f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # header only: the size check runs before any pixel is decoded
            if w * h > limits.max_image_pixels:
                raise InputError(f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_image_pixels}")
            img.load()
    except InputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise InputError("image could not be decoded: not a JPEG/PNG/WebP/BMP/GIF/TIFF file") from None
        raise InputError(f"image refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"image could not be decoded (truncated or corrupt): {e}") from None
    if w == 0 or h == 0:
        raise InputError("image has zero width or height")
    return to_rgb(img)


def to_rgb(img):
    from PIL import Image

    if img.mode == "P":  # palette: may carry transparency
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")  # L, I;16, CMYK, YCbCr, ... -> RGB


def pixel_values(images: list, image_processor) -> np.ndarray:
    """RGB PIL images -> (B, 3, S, S) float32 with CLIP's resize/crop/normalize."""
    images = [_trim_aspect(img) for img in images]
    out = image_processor(images=images, return_tensors="np", input_data_format="channels_last")
    return out["pixel_values"].astype(np.float32)


def _trim_aspect(img, max_ratio: float = 2.0):
    """CLIP resizes the short side and keeps only the centre square, so the far ends of a very long
    image never reach the model; cutting them first keeps a 1x100000 image from becoming a 32x3.2M one."""
    w, h = img.size
    if max(w, h) <= max_ratio * min(w, h):
        return img
    if w > h:
        keep = int(max_ratio * h)
        left = (w - keep) // 2
        return img.crop((left, 0, left + keep, h))
    keep = int(max_ratio * w)
    top = (h - keep) // 2
    return img.crop((0, top, w, top + keep))


# ----------------------------------------------------------------------------------------------- audio
def load_audio(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Encoded WAV/FLAC/OGG bytes at any rate and channel count -> mono float32 at 16 kHz."""
    import soundfile as sf

    if not data:
        raise InputError("audio is empty (0 bytes)")
    if len(data) > limits.max_audio_bytes:
        raise InputError(f"audio is {len(data)} bytes, over the limit of {limits.max_audio_bytes}")
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:
        raise InputError("audio could not be decoded: not a WAV/FLAC/OGG file") from None
    if info.samplerate <= 0 or info.frames <= 0:
        raise InputError("audio holds no samples")
    seconds = info.frames / info.samplerate
    if seconds > limits.max_audio_seconds:
        raise InputError(f"audio is {seconds:.1f} s long, over the limit of {limits.max_audio_seconds:g} s")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise InputError(f"audio could not be decoded (truncated or corrupt): {e}") from None
    if samples.size == 0:
        raise InputError("audio holds no samples")
    mono = samples.mean(axis=1)  # downmix (frames, channels) -> (frames,)
    if not np.isfinite(mono).all():
        raise InputError("audio holds NaN or infinite samples")
    return resample(mono, rate, SAMPLE_RATE)


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return x.astype(np.float32)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)  # band-limited, no aliasing


def audio_features(samples: np.ndarray, feature_extractor) -> np.ndarray:
    """16 kHz mono -> Whisper log-mel features (1, n_mels, 3000), padded to the 30 s window."""
    return feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"].astype(np.float32)
