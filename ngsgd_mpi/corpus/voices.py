"""Random espeak-ng speakers: accent, pitch, formants, voice source, breathiness, rate.

An espeak voice file is a list of ``keyword values`` lines where later lines
override earlier ones.  A speaker's file is the accent's language file from
espeak-ng-data/lang (phoneme table, dictionary rules, stress) followed by the
speaker's own lines:

* ``pitch BASE TOP`` (Hz): male base 65-110, female 140-200; top = base + range.
* ``formant N FREQ% HEIGHT% WIDTH%`` for N = 0..8: one vocal-tract scale per
  speaker (male 0.92-1.04, female 1.05-1.18, i.e. tract length) with a few
  percent of per-formant jitter; random heights and widths (voice quality).
* ``klatt K``: K = 1..6 picks one of espeak's Klatt voice sources (40 % of
  speakers); otherwise espeak's default (wavegen) source.
* ``breath`` / ``breathw``: breathiness for 30 % of speakers.
* ``flutter`` (F0 jitter), ``roughness``, ``voicing`` and ``consonants`` levels.

Speaking rate (words per minute) and the espeak pitch-range parameter are
kept with the voice and passed to each synthesis call.

Voice files go to a short lower-case directory because espeak-ng lower-cases
and truncates (about 60 characters) the path given to espeak_SetVoiceByFile.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import tempfile

import numpy as np

from ngsgd_mpi.corpus.phones import ACCENTS

KLATT_FRACTION = 0.4
BREATHY_FRACTION = 0.3


@dataclasses.dataclass(frozen=True)
class Voice:
    """One synthetic speaker.

    Fields:
      speaker_id:       Kaldi speaker id (also the voice file name).
      accent:           key of :data:`ngsgd_mpi.corpus.phones.ACCENTS`.
      gender:           "m" or "f" (spk2gender).
      pitch_hz:         (base, top) of the F0 range in Hz.
      formants:         9 rows (frequency %, height %, width %) for espeak formants 0..8.
      klatt:            0 = espeak's default voice source, 1..6 = a Klatt source variant.
      breath:           8 breath-noise levels for formants 1..8 (all 0 = not breathy).
      flutter:          F0 jitter (espeak default 64).
      roughness:        voice roughness 0..7.
      voicing:          voiced-sound level, %.
      consonants:       consonant level, %.
      words_per_minute: speaking rate (per-utterance jitter is added at synthesis).
      pitch_range:      espeak pitch-range parameter 0..100 (50 = voice default).
    """

    speaker_id: str
    accent: str
    gender: str
    pitch_hz: tuple[int, int]
    formants: tuple[tuple[int, int, int], ...]
    klatt: int
    breath: tuple[int, ...]
    flutter: int
    roughness: int
    voicing: int
    consonants: int
    words_per_minute: int
    pitch_range: int


def random_voice(rng: np.random.Generator, speaker_id: str, accents=tuple(ACCENTS)) -> Voice:
    """A random speaker; ``accents`` restricts the accent choice."""
    for accent in accents:
        if accent not in ACCENTS:
            raise ValueError(f"accent must be one of {', '.join(ACCENTS)}, got {accent!r}")
    accent = str(accents[rng.integers(len(accents))])
    gender = "m" if rng.random() < 0.5 else "f"
    if gender == "m":
        base = rng.uniform(65, 110)
        top = base + rng.uniform(25, 60)
        tract = rng.uniform(0.92, 1.04)
    else:
        base = rng.uniform(140, 200)
        top = base + rng.uniform(40, 90)
        tract = rng.uniform(1.05, 1.18)
    formants = tuple(
        (round(100 * tract * (1 + 0.03 * rng.standard_normal())),
         round(rng.uniform(85, 115)),
         round(rng.uniform(80, 130)))
        for _ in range(9))
    klatt = int(rng.integers(1, 7)) if rng.random() < KLATT_FRACTION else 0
    if rng.random() < BREATHY_FRACTION:
        level = rng.uniform(5, 40)
        breath = tuple(round(level * w) for w in (1.0, 1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.2))
    else:
        breath = (0,) * 8
    return Voice(
        speaker_id=speaker_id, accent=accent, gender=gender,
        pitch_hz=(round(base), round(top)), formants=formants, klatt=klatt,
        breath=breath, flutter=int(rng.integers(20, 81)), roughness=int(rng.integers(0, 5)),
        voicing=int(rng.integers(85, 116)), consonants=int(rng.integers(80, 121)),
        words_per_minute=int(rng.integers(135, 201)), pitch_range=int(rng.integers(30, 81)))


def voice_file_text(voice: Voice, data_dir: str) -> str:
    """Contents of the espeak voice file of ``voice`` (its accent's language file + overrides)."""
    with open(os.path.join(data_dir, "lang", ACCENTS[voice.accent]), encoding="utf-8") as f:
        lines = [f.read().rstrip("\n"), ""]
    lines.append(f"name {voice.speaker_id}")
    lines.append(f"gender {'male' if voice.gender == 'm' else 'female'}")
    lines.append(f"pitch {voice.pitch_hz[0]} {voice.pitch_hz[1]}")
    for n, (freq, height, width) in enumerate(voice.formants):
        lines.append(f"formant {n} {freq} {height} {width}")
    if voice.klatt:
        lines.append(f"klatt {voice.klatt}")
    if any(voice.breath):
        lines.append("breath " + " ".join(map(str, voice.breath)))
        lines.append("breathw 150 150 200 200 400 400 400 400")
    lines.append(f"flutter {voice.flutter}")
    lines.append(f"roughness {voice.roughness}")
    lines.append(f"voicing {voice.voicing}")
    lines.append(f"consonants {voice.consonants}")
    return "\n".join(lines) + "\n"


def make_voice_dir() -> str:
    """A new short, lower-case directory for voice files (espeak mangles other paths)."""
    base = tempfile.gettempdir()
    if base != base.lower() or len(base) > 24:
        base = "/tmp"
    path = os.path.join(base, f"ngsgd-voices-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(path, 0o700)
    return path


def write_voice_files(voices, data_dir: str, directory: str) -> dict[str, str]:
    """Write one voice file per speaker into ``directory``; returns speaker_id -> path."""
    paths = {}
    for voice in voices:
        path = os.path.join(directory, voice.speaker_id.lower())
        if len(path) > 60:
            raise ValueError(f"voice file path must be at most 60 characters, got {path!r}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(voice_file_text(voice, data_dir))
        paths[voice.speaker_id] = path
    return paths


def remove_voice_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
