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
    # Read from the header before any sample is decoded: a header may declare 2,147,483,647 Hz or 1,024
    # channels, and the decoder and the resampler would allocate for what it says.
    min_audio_sample_rate: int = 1_000
    max_audio_sample_rate: int = 384_000  # the highest rate audio hardware records
    max_audio_channels: int = 8  # 7.1 surround
    max_audio_decoded_bytes: int = 64 * 1024 * 1024  # frames x channels x 4 bytes (float32)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.min_audio_sample_rate > self.max_audio_sample_rate:
            raise ValueError("min_audio_sample_rate is above max_audio_sample_rate")

    @classmethod
    def from_parameters(cls, params) -> Limits:
        """The limits named in a model config's parameters (strings); the others keep their defaults."""
        from dataclasses import fields

        return cls(**{f.name: type(getattr(cls, f.name))(params[f.name]) for f in fields(cls) if f.name in params})


# ---------------------------------------------------------------------------------------------- images
def load_image(data: bytes, limits: Limits = Limits(), min_side: int | None = None):
    """Encoded JPEG/PNG/WebP/BMP/... bytes -> RGB PIL image. Transparent images are put on white.

    With `min_side` (what the model needs: CLIP's input size), a JPEG is decoded at the smallest of 1/2, 1/4,
    1/8 scale that keeps its short side at least twice that (libjpeg's draft mode): a 40 MP photo becomes
    ~0.6 MP without ever being decoded at full size, and the model, which sees 224 or 336 pixels, sees the same.
    """
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
            if min_side and img.format == "JPEG" and min(w, h) > 4 * min_side:
                scale = min(w, h) / (2 * min_side)  # draft keeps both sides >= the asked size
                img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
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


def image_pixels(data: bytes, image_processor, limits: Limits = Limits()) -> np.ndarray:
    """Encoded image bytes -> (1, 3, S, S) float32: what every path (ask, serving, training) feeds the vision
    tower. A large JPEG is decoded at reduced scale (`load_image`'s min_side is the processor's crop)."""
    crop = getattr(image_processor, "crop_size", None) or {}
    side = min(crop.values()) if isinstance(crop, dict) and crop else None
    return pixel_values([load_image(data, limits, min_side=side)], image_processor)


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
    if not limits.min_audio_sample_rate <= info.samplerate <= limits.max_audio_sample_rate:
        raise InputError(f"audio declares a sample rate of {info.samplerate} Hz; accepted: "
                         f"{limits.min_audio_sample_rate}-{limits.max_audio_sample_rate} Hz")
    if not 1 <= info.channels <= limits.max_audio_channels:
        raise InputError(f"audio declares {info.channels} channels; accepted: 1-{limits.max_audio_channels}")
    if info.frames <= 0:
        raise InputError("audio holds no samples")
    seconds = info.frames / info.samplerate
    if seconds > limits.max_audio_seconds:
        raise InputError(f"audio is {seconds:.1f} s long, over the limit of {limits.max_audio_seconds:g} s")
    decoded = info.frames * info.channels * 4
    if decoded > limits.max_audio_decoded_bytes:
        raise InputError(f"audio would decode to {decoded} bytes ({info.frames} frames x {info.channels} channels), "
                         f"over the limit of {limits.max_audio_decoded_bytes}")
    try:
        # never more frames than the header declared (and was checked): compressed data may hold more
        samples, rate = sf.read(io.BytesIO(data), frames=info.frames, dtype="float32", always_2d=True)
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
    up, down = target // g, rate // g
    if max(up, down) > 1_000:
        # an odd rate (e.g. 22,051 Hz) makes the polyphase filter millions of taps long: resample in the
        # frequency domain instead (band-limited too; the input is at most one 30 s window)
        from scipy.signal import resample as fft_resample

        return fft_resample(x, max(1, round(len(x) * target / rate))).astype(np.float32)
    return resample_poly(x, up, down).astype(np.float32)  # band-limited, no aliasing


def audio_features(samples: np.ndarray, feature_extractor) -> np.ndarray:
    """16 kHz mono -> Whisper log-mel features (1, n_mels, 3000), padded to the 30 s window."""
    return feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"].astype(np.float32)
