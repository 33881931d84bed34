"""Real speech synthesis without system packages: libespeak-ng from the `espeakng-loader` wheel, through ctypes.

    voice = Espeak()
    waveform, rate = voice.speak("two red circles", language="en")     # int16 samples at 22050 Hz
    waveform, rate = voice.speak("两个红色的圆形", language="cmn")

Synthesis is deterministic for the same text, voice and parameters, which keeps the demo corpus reproducible.
The library keeps global state, so use one `Espeak` per process.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POSITION_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAMETER = {"rate": 1, "volume": 2, "pitch": 3}
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    def __init__(self) -> None:
        import espeakng_loader

        self._library = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        self._library.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._library.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._library.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        data_parent = os.path.dirname(espeakng_loader.get_data_path())  # the folder holding espeak-ng-data
        self.sampling_rate = self._library.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent.encode(), 0)
        if self.sampling_rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise with its data at {data_parent}")
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept on self: ctypes must not free it while in use
        self._library.espeak_SetSynthCallback(self._callback)

    def _collect(self, samples, count: int, _events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0

    def speak(self, text: str, language: str, rate: int = 160, pitch: int = 50) -> tuple[np.ndarray, int]:
        """Synthesise `text` with the espeak-ng voice `language` ("en", "cmn", ...) at `rate` words per minute.

        Returns int16 samples and the sampling rate. Raises ValueError for an unknown voice.
        """
        if self._library.espeak_SetVoiceByName(language.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {language!r}")
        self._library.espeak_SetParameter(_PARAMETER["rate"], rate, 0)
        self._library.espeak_SetParameter(_PARAMETER["pitch"], pitch, 0)
        encoded = text.encode("utf-8")
        self._chunks = []
        status = self._library.espeak_Synth(
            encoded, len(encoded) + 1, 0, _POSITION_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        self._library.espeak_Synchronize()
        if status != 0 or not self._chunks:
            raise RuntimeError(f"espeak-ng could not speak {text!r} (status {status})")
        return np.concatenate(self._chunks), self.sampling_rate
