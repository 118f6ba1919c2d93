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
