"""ctypes binding to the espeak-ng C library, with phoneme-level timing.

Only the handful of calls the corpus recipe needs are bound.  Facts about the
library that this module relies on (espeak-ng 1.51, Debian 12):

* ``espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, buflength_ms, path, options)``
  makes ``espeak_Synth`` run in the calling thread and hand audio to the synth
  callback in chunks; it returns the sample rate (22050 Hz) or -1.
* With ``espeakINITIALIZE_PHONEME_EVENTS`` the callback also receives PHONEME
  events (type 7).  Their ``sample`` field is the absolute index (counted from
  the start of the ``espeak_Synth`` call) of the first audio sample of that
  phoneme, and ``id.string`` holds its mnemonic (e.g. ``b"tS"``, ``b"aI"``).
* WORD events (type 1) arrive before the PHONEME events of their word;
  ``text_position`` is the 1-based character offset of the word in the input
  text (the lexicon of the recipe is read off them, :mod:`.lexicon`).
* ``espeakINITIALIZE_DONT_EXIT`` stops the library from calling ``exit()``
  when its data directory is missing.
* ``espeak_SetVoiceByFile`` lower-cases the path it is given and keeps only
  about 60 characters of it, so voice files must live under a short,
  lower-case directory (see :mod:`ngsgd_mpi.corpus.voices`).
* The noise sources of the synthesiser (frication, breath, Klatt noise) draw
  from libc ``rand()``; :meth:`EspeakSynthesizer.synthesize` calls ``srand``
  with a per-utterance seed, so audio does not depend on what the process
  synthesised before (the corpus is then independent of ``--jobs``).
* All state is global to the process: one :class:`EspeakSynthesizer` per
  process (:func:`get_synthesizer`), and parallelism by worker processes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np

INSTALL_HINT = "apt-get install libespeak-ng1 espeak-ng-data"

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_PHONEME = 7
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1      # words per minute, 80..450
_PARAM_PITCH = 3     # 0..100, 50 = the voice's own pitch
_PARAM_RANGE = 4     # 0..100, 50 = the voice's own pitch range
_EE_OK = 0
_PHONEMES_SPACE_SEPARATED = ord(" ") << 8   # phonememode: ascii names, this separator between them
_STRESS_MARKS = "',%="


class EspeakUnavailableError(RuntimeError):
    """The espeak-ng library or its data files cannot be used on this machine."""


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    # Mirrors espeak_EVENT in speak_lib.h.
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),   # milliseconds
        ("sample", ctypes.c_int),           # absolute sample index
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.POINTER(_Event))

_LIBRARY_NAMES = ("libespeak-ng.so.1", "libespeak-ng.so")


def load_library() -> ctypes.CDLL:
    """Open libespeak-ng, or raise :class:`EspeakUnavailableError` with the install command."""
    names = list(_LIBRARY_NAMES)
    found = ctypes.util.find_library("espeak-ng")
    if found:
        names.insert(0, found)
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise EspeakUnavailableError(
        f"the espeak-ng C library (libespeak-ng.so.1) was not found; install it with: {INSTALL_HINT}")


def espeak_available() -> bool:
    """True when libespeak-ng can be opened (its data files are checked at initialisation)."""
    try:
        load_library()
    except EspeakUnavailableError:
        return False
    return True


class EspeakSynthesizer:
    """One initialised espeak-ng engine (the library allows one per process).

    Fields:
      lib:         the ctypes handle of libespeak-ng.
      sample_rate: output rate reported by the library (22050 Hz).
      data_dir:    the espeak-ng-data directory the library loaded (has ``lang/``).
      _chunks:     int16 audio chunks of the utterance being synthesised.
      _phonemes:   (sample index, mnemonic) of each PHONEME event so far.
      _words:      (number of PHONEME events before it, text position) of each WORD event so far.
      _callback:   the ctypes callback object; kept referenced so it is not freed.
      _libc:       the C library, for srand().
    """

    def __init__(self):
        lib = load_library()
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetVoiceByFile.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        # Only the data path from the environment is honoured; None = the library's built-in path.
        data_path = os.environ.get("ESPEAK_DATA_PATH")
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 500,
                                     data_path.encode() if data_path else None,
                                     _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise EspeakUnavailableError(
                f"espeak-ng failed to initialise (its data files are probably missing); "
                f"install them with: {INSTALL_HINT}")
        path = ctypes.c_char_p()
        lib.espeak_Info(ctypes.byref(path))
        self.lib = lib
        self._libc = ctypes.CDLL(None)   # the process's C library, whose rand() espeak uses
        self._libc.srand.argtypes = [ctypes.c_uint]
        self.sample_rate = int(rate)
        self.data_dir = find_data_dir(path.value.decode() if path.value else None)
        self._chunks: list[np.ndarray] = []
        self._phonemes: list[tuple[int, str]] = []
        self._words: list[tuple[int, int]] = []
        self._callback = _SynthCallback(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            if events[i].type == _EVENT_PHONEME:
                self._phonemes.append((int(events[i].sample), events[i].id.string.decode("ascii")))
            elif events[i].type == _EVENT_WORD:
                self._words.append((len(self._phonemes), int(events[i].text_position)))
            i += 1
        return 0  # 0 = keep synthesising

    def set_voice_file(self, path: str) -> None:
        """Load a voice file (absolute, lower-case path of at most 60 characters)."""
        if path != path.lower() or len(path) > 60:
            raise ValueError(f"voice file path must be lower-case and at most 60 characters "
                             f"(espeak-ng mangles others), got {path!r}")
        if self.lib.espeak_SetVoiceByFile(path.encode()) != _EE_OK:
            raise EspeakUnavailableError(f"espeak-ng could not load voice file {path!r}")

    def set_voice_name(self, name: str) -> None:
        """Select a built-in voice by name (e.g. ``"en-us"``)."""
        if self.lib.espeak_SetVoiceByName(name.encode()) != _EE_OK:
            raise EspeakUnavailableError(f"espeak-ng has no voice named {name!r}; install espeak-ng-data")

    def synthesize(self, text: str, words_per_minute: int = 175, pitch: int = 50,
                   pitch_range: int = 50, seed: int = 0):
        """Speak ``text`` with the current voice; ``seed`` seeds espeak's noise generator.

        Returns (int16 samples at ``sample_rate``, [(start sample, espeak mnemonic), ...],
        [(index of the word's first phoneme event, 1-based text position), ...]).
        Pause phonemes (``_``, ``_:``, ...) are included; their meaning is left to the caller.
        """
        lib = self.lib
        lib.espeak_SetParameter(_PARAM_RATE, int(np.clip(words_per_minute, 80, 450)), 0)
        lib.espeak_SetParameter(_PARAM_PITCH, int(np.clip(pitch, 0, 100)), 0)
        lib.espeak_SetParameter(_PARAM_RANGE, int(np.clip(pitch_range, 0, 100)), 0)
        self._chunks, self._phonemes, self._words = [], [], []
        self._libc.srand(int(seed) & 0xFFFFFFFF)
        data = text.encode("utf-8")
        status = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        if status != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with status {status} for text {text!r}")
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        phonemes, words = self._phonemes, self._words
        self._chunks, self._phonemes, self._words = [], [], []
        return audio, phonemes, words

    def text_to_phonemes(self, text: str) -> list[list[str]]:
        """The phoneme mnemonics of ``text`` in the current voice, without speaking:
        one list per phonological word (espeak_TextToPhonemes with a space between
        phonemes and two between words), stress marks removed."""
        buffer = ctypes.c_char_p(text.encode("utf-8"))
        pointer = ctypes.cast(ctypes.pointer(buffer), ctypes.POINTER(ctypes.c_char_p))
        words = []
        while buffer.value:
            out = self.lib.espeak_TextToPhonemes(pointer, _CHARS_UTF8, _PHONEMES_SPACE_SEPARATED)
            for word in (out or b"").decode("ascii", "replace").split("  "):
                mnemonics = [m.lstrip(_STRESS_MARKS) for m in word.split(" ")]
                if any(mnemonics):
                    words.append([m for m in mnemonics if m])
        return words


_DATA_DIR_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/espeak-ng-data",
    "/usr/lib/aarch64-linux-gnu/espeak-ng-data",
    "/usr/share/espeak-ng-data",
    "/usr/local/share/espeak-ng-data",
)


def find_data_dir(reported: str | None = None) -> str:
    """The espeak-ng-data directory: the one the library reports, else the usual Debian places."""
    candidates = [reported] if reported else []
    if os.environ.get("ESPEAK_DATA_PATH"):
        candidates.append(os.path.join(os.environ["ESPEAK_DATA_PATH"], "espeak-ng-data"))
        candidates.append(os.environ["ESPEAK_DATA_PATH"])
    candidates.extend(_DATA_DIR_CANDIDATES)
    for directory in candidates:
        if directory and os.path.isdir(os.path.join(directory, "lang")):
            return directory
    raise EspeakUnavailableError(f"espeak-ng-data (with lang/) not found; install it with: {INSTALL_HINT}")


_synthesizer: EspeakSynthesizer | None = None


def get_synthesizer() -> EspeakSynthesizer:
    """The process-wide synthesizer, initialised on first use."""
    global _synthesizer
    if _synthesizer is None:
        _synthesizer = EspeakSynthesizer()
    return _synthesizer
