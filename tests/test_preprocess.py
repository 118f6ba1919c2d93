"""What users send: odd images and audio decode the same way everywhere, bad ones get a named error."""

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmgpt.preprocess import SAMPLE_RATE, InputError, Limits, load_audio, load_image, pixel_values


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    out = load_image(encode(img))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    half = load_image(encode(Image.new("RGBA", (8, 8), (0, 0, 0, 128))))
    assert 120 <= half.getpixel((0, 0))[0] <= 135


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("I;16", "PNG"), ("LA", "PNG")])
def test_modes_become_rgb(mode, fmt):
    img = Image.new("RGB", (20, 10), (10, 200, 30)).convert(mode)
    out = load_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_palette_with_transparency():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    out = load_image(encode(img))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_tiny_and_large_images_reach_the_model_size(tiny_components):
    proc = tiny_components.image_processor
    s = tiny_components.config.image_size
    for size in [(1, 1), (3, 700), (3000, 2000)]:
        px = pixel_values([load_image(encode(Image.new("RGB", size, (1, 2, 3))))], proc)
        assert px.shape == (1, 3, s, s) and px.dtype == np.float32


def test_pixel_limit_refuses_before_decoding():
    data = encode(Image.new("L", (3000, 3000)))
    with pytest.raises(InputError, match="over the limit"):
        load_image(data, Limits(max_image_pixels=1_000_000))


def test_decompression_bomb_header_is_refused():
    # A PNG whose header claims 100000x100000 pixels: refused from the header, no 10 GB allocation.
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")
    with pytest.raises(InputError, match="pixels|bomb"):
        load_image(png)


@pytest.mark.parametrize("data, match", [(b"", "empty"), (b"not an image at all", "could not be decoded"), (b"RIFF0000WAVEfmt ", "could not be decoded")])
def test_bad_image_bytes(data, match):
    with pytest.raises(InputError, match=match):
        load_image(data)


def test_truncated_image():
    data = encode(Image.new("RGB", (64, 64), (5, 5, 5)), "JPEG")
    with pytest.raises(InputError, match="decoded"):
        load_image(data[: len(data) // 2])


def wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_stereo_44k_is_downmixed_and_resampled():
    rate = 44100
    t = np.arange(rate) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, -left + 0.2], axis=1)  # mean = 0.1 everywhere
    out = load_audio(wav_bytes(stereo, rate, subtype="PCM_16"))
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(out.size - SAMPLE_RATE) <= 1
    assert np.allclose(out[100:-100], 0.1, atol=2e-3)


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_24"), ("WAV", "FLOAT"), ("FLAC", None), ("OGG", "VORBIS")])
def test_audio_formats(fmt, subtype):
    rate = 22050
    x = 0.3 * np.sin(2 * np.pi * 300 * np.arange(rate // 2) / rate)
    out = load_audio(wav_bytes(x, rate, fmt, subtype))
    assert abs(out.size - SAMPLE_RATE // 2) <= 2
    assert 0.15 < np.abs(out).max() < 0.4


def test_bad_audio():
    with pytest.raises(InputError, match="empty"):
        load_audio(b"")
    with pytest.raises(InputError, match="could not be decoded"):
        load_audio(b"\x00" * 1000)
    with pytest.raises(InputError, match="over the limit"):
        load_audio(wav_bytes(np.zeros(16000 * 31, np.float32), 16000))
    with pytest.raises(InputError, match="no samples"):
        load_audio(wav_bytes(np.zeros(0, np.float32), 16000))


def test_long_thin_image_keeps_the_centre(tiny_components):
    proc = tiny_components.image_processor
    img = Image.new("RGB", (2, 40000), (0, 0, 255))
    img.paste((255, 0, 0), (0, 19990, 2, 20010))  # a red band in the middle
    px = pixel_values([load_image(encode(img))], proc)
    assert px.shape[-1] == tiny_components.config.image_size
    assert px[0, 0].max() > px[0, 2].max()  # red reached the model: the centre was kept


def _patched_wav(rate: int | None = None, channels: int | None = None) -> bytes:
    """A valid 16 kHz mono PCM_16 WAV whose header is then made to declare another rate or channel count."""
    import struct

    data = bytearray(wav_bytes(np.zeros(1600, np.float32), 16000, subtype="PCM_16"))
    assert data[:4] == b"RIFF" and data[12:16] == b"fmt "
    if channels is not None:
        data[22:24] = struct.pack("<H", channels)
        data[32:34] = struct.pack("<H", 2 * channels)  # block align, so the header stays self-consistent
    if rate is not None:
        data[24:28] = struct.pack("<I", rate)
        data[28:32] = struct.pack("<I", rate * 2 * (channels or 1))  # byte rate
    return bytes(data)


@pytest.mark.parametrize("rate, channels, match", [
    (2_147_483_647, None, "sample rate of 2147483647 Hz"),
    (50, None, "sample rate of 50 Hz"),
    (None, 1024, "1024 channels"),
])
def test_audio_header_is_checked_before_decoding(rate, channels, match):
    with pytest.raises(InputError, match=match):
        load_audio(_patched_wav(rate, channels))


def test_decoded_size_is_bounded_by_the_header():
    stereo = np.zeros((16000 * 10, 2), np.float32)  # 10 s x 2 channels x 4 bytes = 1.28 MB decoded
    data = wav_bytes(stereo, 16000, subtype="PCM_16")
    assert load_audio(data, Limits(max_audio_decoded_bytes=2_000_000)).size == 16000 * 10
    with pytest.raises(InputError, match="would decode to 1280000 bytes"):
        load_audio(data, Limits(max_audio_decoded_bytes=1_000_000))


def test_an_odd_sample_rate_resamples_quickly_and_exactly():
    import time

    rate = 22051  # coprime with 16,000: a polyphase filter would need millions of taps
    x = 0.3 * np.sin(2 * np.pi * 300 * np.arange(rate * 5) / rate)
    t = time.perf_counter()
    out = load_audio(wav_bytes(x, rate, subtype="FLOAT"))
    assert time.perf_counter() - t < 10  # generous: seconds, where the polyphase filter took minutes and GBs
    assert abs(out.size - 5 * SAMPLE_RATE) <= 1
    ref = 0.3 * np.sin(2 * np.pi * 300 * np.arange(out.size) / SAMPLE_RATE)
    assert np.abs(out[2000:-2000] - ref[2000:-2000]).max() < 0.01


def test_limits_come_from_config_parameters_and_refuse_nonsense():
    limits = Limits.from_parameters({"max_audio_sample_rate": "48000", "max_audio_seconds": "12.5", "other": "x"})
    assert limits.max_audio_sample_rate == 48000 and limits.max_audio_seconds == 12.5
    assert limits.max_audio_channels == Limits().max_audio_channels
    with pytest.raises(ValueError, match="max_audio_channels must be > 0"):
        Limits(max_audio_channels=0)


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_looks_the_same_to_the_model(tiny_components):
    from mmgpt.preprocess import image_pixels

    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((4000, 3000), Image.BILINEAR)  # smooth, like a photo
    data = encode(img, "JPEG")
    side = tiny_components.image_processor.crop_size["height"]
    draft = load_image(data, min_side=side)
    assert 2 * side <= min(draft.size) < 3000 // 2  # reduced by libjpeg, still twice what the model sees
    full = pixel_values([load_image(data)], tiny_components.image_processor)
    assert np.abs(image_pixels(data, tiny_components.image_processor) - full).mean() < 0.02
