"""Speech synthesis with espeak-ng, for test audio and measurements (what people say to the assistant).

espeak-ng comes from the `espeakng-loader` wheel (libespeak-ng 1.52 and its espeak-ng-data, voice
variants included) and is driven through ctypes: no system package, no subprocess.

    samples, rate = synthesize("What color is the heart?", "en-gb-x-rp+f2")
    wav = synthesize_wav("Is there a yellow star?", "en-029")

libespeak-ng keeps one global state (voice, rate, pitch, the synthesis callback, and wave-generator
state no call resets), so every synthesis holds one lock and runs in a freshly loaded copy of the
library: the same text, voice and settings give identical samples every time, whatever came before.
"""

from __future__ import annotations

import ctypes
import io
import shutil
import tempfile
import threading
import wave
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

DEFAULT_RATE = 175  # words per minute, espeak-ng's default (80..450)
DEFAULT_PITCH = 50  # 0..100, espeak-ng's default

# espeak_lib.h / speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_RATE, _VOLUME, _PITCH, _RANGE, _PUNCTUATION, _CAPITALS, _WORDGAP = 1, 2, 3, 4, 5, 6, 7
_EE_OK = 0


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # (priority byte, NUL-terminated name)*, then a 0 byte
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class Voice:
    """One espeak-ng voice file: `key` is what `synthesize` accepts (its file name, lowercase)."""

    key: str  # "en-us", "en-gb-x-rp", "en-029", "en"
    identifier: str  # its path under espeak-ng-data/voices or lang: "gmw/en-US"
    name: str  # "English (America)"
    languages: tuple[tuple[str, int], ...]  # (language, priority): lower priority = better match


class _Engine:
    """libespeak-ng behind one lock, loaded afresh for every synthesis.

    espeak-ng 1.52 keeps state that no API call resets (function-local statics in its wave generator:
    the pitch-flutter phase, the gain control, cycle counters), so the same text would come out
    slightly different depending on what was spoken before. A private copy of the library is opened,
    used and closed (dlclose unloads it, so the next open starts from zeroed statics): ~5 ms a call,
    identical samples every time, and no other user of espeakng-loader in the process shares its state.
    """

    def __init__(self):
        import espeakng_loader

        self.lock = threading.Lock()
        self.data_path = Path(espeakng_loader.get_data_path())
        self._dir = tempfile.TemporaryDirectory(prefix="mmgpt-espeak-")  # removed when the engine goes
        self.library_path = Path(self._dir.name) / "libespeak-ng-mmgpt.so"
        shutil.copyfile(espeakng_loader.get_library_path(), self.library_path)
        self.callback = _SynthCallback(self._collect)  # kept alive here: the library holds a raw pointer
        self.chunks: list[np.ndarray] = []
        with self.lock:
            lib = self._open()
            try:
                self.voices = self._list_voices(lib)
            finally:
                self._close(lib)
        self.variants = tuple(sorted(p.name for p in (self.data_path / "voices" / "!v").iterdir() if p.is_file()))

    def _open(self):
        lib = ctypes.CDLL(str(self.library_path))
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            self._close(lib, terminate=False)
            raise RuntimeError(f"espeak-ng failed to initialise with data at {self.data_path}")
        self.sample_rate = rate
        lib.espeak_SetSynthCallback(self.callback)
        return lib

    @staticmethod
    def _close(lib, terminate: bool = True) -> None:
        import _ctypes

        if terminate:
            lib.espeak_Terminate()
        _ctypes.dlclose(lib._handle)

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = go on

    @staticmethod
    def _list_voices(lib) -> tuple[Voice, ...]:
        voices = []
        table = lib.espeak_ListVoices(None)
        i = 0
        while table[i]:
            v = table[i].contents
            languages, pos = [], v.languages
            while (priority := ctypes.string_at(pos, 1)[0]) != 0:
                lang = ctypes.string_at(pos + 1).decode()
                languages.append((lang, priority))
                pos += 2 + len(lang)
            identifier = v.identifier.decode()
            voices.append(Voice(identifier.rsplit("/", 1)[-1].lower(), identifier, v.name.decode(), tuple(languages)))
            i += 1
        return tuple(voices)

    def synthesize(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        data = text.encode("utf-8") + b"\0"
        with self.lock:
            self.chunks = []
            lib = self._open()
            try:
                if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                    raise ValueError(f"espeak-ng refused voice {voice!r}")
                for param, value in ((_RATE, rate), (_PITCH, pitch), (_VOLUME, 100), (_RANGE, 50),
                                     (_PUNCTUATION, 0), (_CAPITALS, 0), (_WORDGAP, 0)):
                    lib.espeak_SetParameter(param, value, 0)
                status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
                lib.espeak_Synchronize()
            finally:
                self._close(lib)
            chunks, self.chunks = self.chunks, []
        if status != _EE_OK:
            raise RuntimeError(f"espeak-ng synthesis failed with status {status}")
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        return pcm.astype(np.float32) / np.float32(32768.0)


@cache
def _engine() -> _Engine:
    return _Engine()


def english_voices() -> list[str]:
    """Names `synthesize` accepts for English: voice files ("en-us", "en-gb-x-rp", "en-029", ...) and the
    languages they declare ("en-gb"), sorted. Any of them takes a variant: "en-us+m3", "en-gb+f2"."""
    names = set()
    for v in _engine().voices:
        if any(lang == "en" or lang.startswith("en-") for lang, _ in v.languages):
            names.add(v.key)
            names.update(lang for lang, _ in v.languages if lang.startswith("en-"))
    return sorted(names)


def variants() -> list[str]:
    """Voice variants ("m3", "f2", "klatt", ...) that follow a voice after a "+"."""
    return list(_engine().variants)


def resolve_voice(voice: str) -> str:
    """"en-gb+f2" -> the espeak-ng voice it selects, "gmw/en+f2"; ValueError naming an unknown one.

    A voice file name wins; otherwise the voice declaring that language with the best priority (as
    espeak-ng would pick, but never its silent fallback to a default voice)."""
    engine = _engine()
    base, _, variant = voice.strip().partition("+")
    base = base.lower()
    match = next((v for v in engine.voices if v.key == base), None)
    if match is None:
        ranked = [(p, v.key, v) for v in engine.voices for lang, p in v.languages if lang == base]
        match = min(ranked, key=lambda r: r[:2])[2] if ranked else None
    if match is None:
        some = ", ".join(english_voices()[:12])
        raise ValueError(f"unknown espeak-ng voice {base!r} in {voice!r}; English voices include: {some}")
    if not variant:
        return match.identifier
    file = next((v for v in engine.variants if v.lower() == variant.lower()), None)  # files: "m3", "Alex"
    if file is None:
        some = ", ".join(v for v in engine.variants if v[:1] in "mf" and v[1:].isdigit())
        raise ValueError(f"unknown espeak-ng voice variant {variant!r} in {voice!r}; variants include: {some}")
    return f"{match.identifier}+{file}"


def synthesize(text: str, voice: str = "en-us", *, rate: int = DEFAULT_RATE, pitch: int = DEFAULT_PITCH) -> tuple[np.ndarray, int]:
    """Text -> (float32 mono samples in [-1, 1], sample rate (22050)). Deterministic, except with the
    variants that add breath noise ("f2", "f3", "f5", "whisper", ...; their voice files set `breath`):
    espeak-ng's noise is not seeded the same in every process, so their samples differ between runs.

    `voice` is a name from `english_voices()` with an optional "+variant"; `rate` in words per minute
    (80..450), `pitch` 0..100."""
    if not 80 <= rate <= 450:
        raise ValueError(f"rate must be within 80..450 words per minute, got {rate}")
    if not 0 <= pitch <= 100:
        raise ValueError(f"pitch must be within 0..100, got {pitch}")
    engine = _engine()
    return engine.synthesize(text, resolve_voice(voice), rate, pitch), engine.sample_rate


def to_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """float32 mono in [-1, 1] -> 16-bit PCM WAV bytes."""
    pcm = np.clip(np.round(np.asarray(samples, np.float64) * 32768.0), -32768, 32767).astype("<i2")  # inverse of synthesize
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def synthesize_wav(text: str, voice: str = "en-us", *, rate: int = DEFAULT_RATE, pitch: int = DEFAULT_PITCH) -> bytes:
    """`synthesize` as WAV file bytes (what a client would upload)."""
    return to_wav(*synthesize(text, voice, rate=rate, pitch=pitch))
