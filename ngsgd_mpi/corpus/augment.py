"""Acoustic degradation of clean espeak speech: speed, reverberation, noise, channel.

Order of operations for one utterance (espeak output, 22050 Hz, int16 scale):

1. silence padding: 0.1-0.4 s of digital silence before and after the speech
   (recordings rarely start on the first phoneme);
2. speed perturbation + resampling to 16 kHz in one polyphase step: playing the
   signal ``speed`` times faster (pitch and tempo change, as Kaldi's speed
   perturbation) is resampling 22050*speed Hz -> 16000 Hz;
3. gain: active-speech level drawn from -35..-15 dBFS;
4. reverberation: convolution with a synthetic room impulse response -- a unit
   direct path at lag 0 (so alignments stay put) plus an exponentially decaying
   Gaussian tail (60 dB down after RT60 seconds) at a random direct-to-reverberant
   ratio;
5. additive noise at a random SNR measured against the *active speech* power
   (non-silence segments): white, pink (1/f), brown (1/f^2), speech-shaped
   (the utterance's own long-term spectrum) or babble (4-6 earlier utterances
   of the session, each resampled by 0.8-1.25 so they sound like other people),
   sometimes with mains hum and a slow level modulation;
6. channel: the speaker's session filter (high-pass, low-pass and two peaking
   equalisers; fixed per speaker, like one microphone per recording session);
7. a dither floor (Gaussian, 1 LSB rms; Kaldi's default dither) and clipping to
   the 16-bit range.

Presets (``--noise``) set the ranges; "none" keeps only steps 1, 2 (speed 1.0)
and 7.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
from scipy import fft, signal

from ngsgd_mpi.corpus.phones import SILENCE

ESPEAK_RATE = 22050
SAMPLE_RATE = 16000
NOISE_TYPES = ("white", "pink", "brown", "speech-shaped", "babble")


@dataclasses.dataclass(frozen=True)
class NoisePreset:
    """Ranges of the random degradations of one ``--noise`` preset.

    Fields:
      speeds:        speed-perturbation factors, drawn uniformly.
      reverb_prob:   probability that an utterance is reverberated.
      rt60_s:        (low, high) reverberation time in seconds.
      drr_db:        (low, high) direct-to-reverberant energy ratio in dB.
      snr_db:        (low, high) SNR in dB, or None for no added noise.
      hum_prob:      probability of mains hum under the noise.
      highpass_hz:   (low, high) channel high-pass cutoff, or None for no channel filter.
      lowpass_hz:    (low, high) channel low-pass cutoff.
      eq_db:         peak gain magnitude of the two channel equaliser bands.
    """

    speeds: tuple[float, ...]
    reverb_prob: float = 0.0
    rt60_s: tuple[float, float] = (0.2, 0.4)
    drr_db: tuple[float, float] = (0.0, 10.0)
    snr_db: tuple[float, float] | None = None
    hum_prob: float = 0.0
    highpass_hz: tuple[float, float] | None = None
    lowpass_hz: tuple[float, float] = (7000.0, 7800.0)
    eq_db: float = 0.0


PRESETS = {
    "none": NoisePreset(speeds=(1.0,)),
    "light": NoisePreset(speeds=(0.95, 1.0, 1.05), reverb_prob=0.2, rt60_s=(0.15, 0.35),
                         drr_db=(3.0, 12.0), snr_db=(20.0, 35.0), hum_prob=0.05,
                         highpass_hz=(40.0, 120.0), lowpass_hz=(6500.0, 7800.0), eq_db=3.0),
    "medium": NoisePreset(speeds=(0.9, 0.95, 1.0, 1.05, 1.1), reverb_prob=0.5, rt60_s=(0.2, 0.6),
                          drr_db=(0.0, 10.0), snr_db=(5.0, 20.0), hum_prob=0.1,
                          highpass_hz=(50.0, 200.0), lowpass_hz=(4500.0, 7800.0), eq_db=6.0),
    "heavy": NoisePreset(speeds=(0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15), reverb_prob=0.8,
                         rt60_s=(0.3, 1.0), drr_db=(-5.0, 6.0), snr_db=(-3.0, 10.0), hum_prob=0.2,
                         highpass_hz=(80.0, 300.0), lowpass_hz=(3400.0, 7500.0), eq_db=9.0),
}


def get_preset(name: str) -> NoisePreset:
    if name not in PRESETS:
        raise ValueError(f"noise must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


class Resampler:
    """Polyphase resampling espeak rate -> 16 kHz with a speed factor; filters cached.

    Fields:
      _filters: (up, down) -> anti-aliasing FIR (designed as scipy.resample_poly's default;
                designing a ~10^5-tap filter per call would cost more than the filtering).
    """

    def __init__(self):
        self._filters: dict[tuple[int, int], np.ndarray] = {}

    @staticmethod
    def ratio(speed: float, rate_in: int = ESPEAK_RATE) -> Fraction:
        """Output samples per input sample: 16000 / (rate_in * speed)."""
        return Fraction(SAMPLE_RATE, rate_in) / Fraction(speed).limit_denominator(100)

    def __call__(self, audio: np.ndarray, speed: float, rate_in: int = ESPEAK_RATE) -> np.ndarray:
        ratio = self.ratio(speed, rate_in)
        up, down = ratio.numerator, ratio.denominator
        key = (up, down)
        if key not in self._filters:
            max_rate = max(up, down)
            self._filters[key] = signal.firwin(20 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))
        return signal.resample_poly(audio, up, down, window=self._filters[key]).astype(np.float32)


def design_channel(rng: np.random.Generator, preset: NoisePreset) -> np.ndarray | None:
    """Second-order sections of one random session channel, or None for a flat channel."""
    if preset.highpass_hz is None:
        return None
    nyquist = SAMPLE_RATE / 2
    sections = [signal.butter(2, rng.uniform(*preset.highpass_hz), "highpass", fs=SAMPLE_RATE, output="sos"),
                signal.butter(4, min(rng.uniform(*preset.lowpass_hz), 0.98 * nyquist), "lowpass",
                              fs=SAMPLE_RATE, output="sos")]
    for _ in range(2):
        sections.append(_peaking_eq(np.exp(rng.uniform(np.log(200.0), np.log(5000.0))),
                                    rng.uniform(-preset.eq_db, preset.eq_db), rng.uniform(0.7, 2.0)))
    return np.concatenate(sections, axis=0)


def _peaking_eq(freq_hz: float, gain_db: float, q: float) -> np.ndarray:
    """One peaking-equaliser biquad (Audio EQ Cookbook) as a (1, 6) sos row."""
    a = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * np.pi * freq_hz / SAMPLE_RATE
    alpha = np.sin(w0) / (2.0 * q)
    b = np.array([1 + alpha * a, -2 * np.cos(w0), 1 - alpha * a])
    den = np.array([1 + alpha / a, -2 * np.cos(w0), 1 - alpha / a])
    return np.concatenate([b / den[0], den / den[0]])[None, :]


def synthetic_rir(rng: np.random.Generator, rt60_s: float, drr_db: float) -> np.ndarray:
    """Room impulse response: unit direct path at lag 0 + exponentially decaying noise tail."""
    length = int(min(1.2 * rt60_s, 1.0) * SAMPLE_RATE)
    t = np.arange(length) / SAMPLE_RATE
    tail = rng.standard_normal(length) * np.exp(-6.908 * t / rt60_s)   # ln(1000) = 60 dB
    tail[: int(rng.uniform(0.002, 0.01) * SAMPLE_RATE)] = 0.0          # pre-delay of the first echo
    tail = signal.lfilter([0.6], [1.0, -0.4], tail)                    # walls absorb highs
    tail *= np.sqrt(10.0 ** (-drr_db / 10.0) / max(np.sum(tail ** 2), 1e-12))
    tail[0] = 1.0
    return tail.astype(np.float32)


def colored_noise(rng: np.random.Generator, length: int, exponent: float) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1 / f**exponent (0 white, 1 pink, 2 brown)."""
    n = fft.next_fast_len(length, real=True)   # odd lengths make the FFT several times slower
    spectrum = fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spectrum *= np.maximum(freqs, 20.0) ** (-exponent / 2.0)
    return fft.irfft(spectrum, n=n)[:length]


def speech_shaped_noise(rng: np.random.Generator, speech: np.ndarray) -> np.ndarray:
    """Noise with the long-term magnitude spectrum of ``speech`` (smoothed over ~60 Hz)."""
    n = fft.next_fast_len(len(speech), real=True)
    magnitude = np.abs(fft.rfft(speech, n=n))
    width = max(1, int(60.0 * n / SAMPLE_RATE))
    magnitude = np.convolve(magnitude, np.ones(width) / width, mode="same")
    phase = np.exp(2j * np.pi * rng.random(len(magnitude)))
    return fft.irfft(magnitude * phase, n=n)[: len(speech)]


def babble_noise(rng: np.random.Generator, length: int, bank, resampler: Resampler) -> np.ndarray:
    """Sum of 4-6 earlier utterances (16 kHz), each shifted in pitch/tempo and time."""
    out = np.zeros(length)
    for _ in range(int(rng.integers(4, 7))):
        talker = bank[int(rng.integers(len(bank)))]
        talker = resampler(talker, rng.choice([0.8, 0.9, 1.1, 1.25]), rate_in=SAMPLE_RATE)
        talker = np.tile(talker, length // max(len(talker), 1) + 2)
        start = int(rng.integers(len(talker) - length))
        out += talker[start: start + length] / np.sqrt(np.mean(talker ** 2) + 1e-12)
    return out


def mains_hum(rng: np.random.Generator, length: int) -> np.ndarray:
    base = 50.0 if rng.random() < 0.5 else 60.0
    t = np.arange(length) / SAMPLE_RATE
    return sum(np.sin(2 * np.pi * base * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 6))


def pad_segments(seg_starts, seg_phones, lead: int, speech_end: int):
    """Segments after ``lead`` samples of silence are put before the audio and some after it.

    The first segment then starts at 0 and silence covers the padding
    (merged with the utterance's own leading/trailing silence).
    """
    starts = np.asarray(seg_starts, dtype=np.int64) + lead
    phones = np.asarray(seg_phones, dtype=np.int16)
    if phones[0] == SILENCE:
        starts[0] = 0
    else:
        starts, phones = np.concatenate([[0], starts]), np.concatenate([[SILENCE], phones])
    if phones[-1] != SILENCE:
        starts = np.concatenate([starts, [speech_end]])
        phones = np.concatenate([phones, [SILENCE]]).astype(np.int16)
    return starts, phones


class Augmenter:
    """Applies one preset's random degradations (see the module docstring).

    Fields:
      preset:    the NoisePreset in force.
      resampler: shared Resampler (filter cache).
    """

    def __init__(self, preset: NoisePreset):
        self.preset = preset
        self.resampler = Resampler()

    def __call__(self, rng: np.random.Generator, audio: np.ndarray, seg_starts: np.ndarray,
                 seg_phones: np.ndarray, channel: np.ndarray | None, babble_bank) -> tuple:
        """Degrade one utterance.

        ``audio``: espeak samples (22050 Hz); ``seg_starts``/``seg_phones``: its segments.
        ``babble_bank``: list of earlier clean 16 kHz utterances (may be empty).
        Returns (16 kHz float32 audio, segment starts in 16 kHz samples, segment phones,
        clean 16 kHz audio); the padding adds silence segments where needed.
        """
        preset = self.preset
        lead, trail = (int(rng.uniform(0.1, 0.4) * ESPEAK_RATE) for _ in range(2))
        padded = np.concatenate([np.zeros(lead), audio.astype(np.float64), np.zeros(trail)])
        starts, phones = pad_segments(seg_starts, seg_phones, lead, lead + len(audio))
        speed = float(rng.choice(preset.speeds))
        clean = self.resampler(padded, speed)
        starts = np.round(starts * float(self.resampler.ratio(speed))).astype(np.int64)
        active = np.repeat(phones != SILENCE,
                           np.diff(np.concatenate([starts, [len(clean)]])).clip(min=0))[: len(clean)]
        x = clean.astype(np.float64)
        if preset.snr_db is not None:
            level_db = rng.uniform(-35.0, -15.0)
            x *= 32768.0 * 10.0 ** (level_db / 20.0) / np.sqrt(np.mean(x[active] ** 2) + 1e-12)
        if rng.random() < preset.reverb_prob:
            rir = synthetic_rir(rng, rng.uniform(*preset.rt60_s), rng.uniform(*preset.drr_db))
            x = signal.oaconvolve(x, rir)[: len(x)]
        if preset.snr_db is not None:
            x += self._noise(rng, x, active, babble_bank)
        if channel is not None:
            x = signal.sosfilt(channel, x)
        x += rng.standard_normal(len(x))
        return np.clip(x, -32768.0, 32767.0).astype(np.float32), starts, phones, clean

    def _noise(self, rng, speech, active, babble_bank) -> np.ndarray:
        kind = NOISE_TYPES[int(rng.integers(len(NOISE_TYPES)))]
        if kind == "babble" and not babble_bank:
            kind = "speech-shaped"
        n = len(speech)
        if kind == "babble":
            noise = babble_noise(rng, n, babble_bank, self.resampler)
        elif kind == "speech-shaped":
            noise = speech_shaped_noise(rng, speech)
        else:
            noise = colored_noise(rng, n, {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind])
        noise /= np.sqrt(np.mean(noise ** 2) + 1e-12)
        if rng.random() < self.preset.hum_prob:
            noise += rng.uniform(0.2, 1.0) * mains_hum(rng, n)
        if rng.random() < 0.5:  # slowly varying level (passing traffic, a fan turning)
            t = np.arange(n) / SAMPLE_RATE
            noise *= 1.0 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 1.0) * t + rng.uniform(0, 2 * np.pi))
        speech_power = np.mean(speech[active] ** 2) if active.any() else np.mean(speech ** 2)
        snr_db = rng.uniform(*self.preset.snr_db)
        return noise * np.sqrt(speech_power / (np.mean(noise ** 2) + 1e-12) / 10.0 ** (snr_db / 10.0))
