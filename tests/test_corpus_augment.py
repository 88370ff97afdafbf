"""Tests of the acoustic degradations (ngsgd_mpi/corpus/augment.py)."""

import numpy as np
import pytest

from ngsgd_mpi.corpus import augment
from ngsgd_mpi.corpus.phones import SILENCE


def _peak_hz(x, rate):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1.0 / rate)[np.argmax(spectrum)]


@pytest.mark.parametrize("speed", [0.9, 1.0, 1.05])
def test_speed_perturbation_scales_length_and_frequency(speed):
    t = np.arange(22050) / 22050.0
    tone = np.sin(2 * np.pi * 1000.0 * t)
    out = augment.Resampler()(tone, speed)
    assert abs(len(out) - 16000 / speed) <= 1
    assert abs(_peak_hz(out, 16000) - 1000.0 * speed) < 3.0


def test_resampler_removes_content_above_the_new_nyquist():
    t = np.arange(22050) / 22050.0
    out = augment.Resampler()(np.sin(2 * np.pi * 10000.0 * t), 1.0)   # 10 kHz > 8 kHz
    assert np.sqrt(np.mean(out[200:-200] ** 2)) < 0.01


def test_rir_has_unit_direct_path_and_requested_drr():
    rng = np.random.default_rng(0)
    rir = augment.synthetic_rir(rng, rt60_s=0.5, drr_db=6.0)
    assert rir[0] == 1.0 and len(rir) == int(0.6 * 16000)
    assert abs(10 * np.log10(1.0 / np.sum(rir[1:] ** 2)) - 6.0) < 0.1
    assert np.sum(rir[1:4000] ** 2) > 10 * np.sum(rir[4000:] ** 2)   # it decays


def test_coloured_noise_slopes():
    rng = np.random.default_rng(1)
    for exponent, sign in ((0.0, 0), (1.0, 1), (2.0, 1)):
        x = augment.colored_noise(rng, 32000, exponent)
        spectrum = np.abs(np.fft.rfft(x)) ** 2
        low, high = spectrum[100:1000].mean(), spectrum[10000:15000].mean()
        ratio_db = 10 * np.log10(low / high)
        assert (abs(ratio_db) < 1.0) if sign == 0 else ratio_db > 5.0


def test_pad_segments_adds_silence_where_needed():
    starts, phones = augment.pad_segments(np.array([0, 50]), np.array([5, 7]), lead=100, speech_end=300)
    assert starts.tolist() == [0, 100, 150, 300] and phones.tolist() == [SILENCE, 5, 7, SILENCE]
    starts, phones = augment.pad_segments(np.array([0, 50]), np.array([SILENCE, 7]), lead=100,
                                          speech_end=300)
    assert starts.tolist() == [0, 150, 300] and phones.tolist() == [SILENCE, 7, SILENCE]


@pytest.mark.parametrize("preset", ["light", "medium", "heavy"])
def test_noise_is_mixed_at_an_snr_inside_the_preset_range(preset):
    rng = np.random.default_rng(2)
    augmenter = augment.Augmenter(augment.get_preset(preset))
    speech = rng.standard_normal(16000) * 1000.0
    active = np.zeros(16000, dtype=bool)
    active[4000:12000] = True
    speech[~active] = 0.0
    bank = [rng.standard_normal(8000)]
    for _ in range(10):
        noise = augmenter._noise(rng, speech, active, bank)
        snr = 10 * np.log10(np.mean(speech[active] ** 2) / np.mean(noise ** 2))
        low, high = augment.get_preset(preset).snr_db
        assert low - 1e-6 <= snr <= high + 1e-6


def test_augmenter_output_and_segments_are_consistent():
    rng = np.random.default_rng(3)
    audio = (rng.standard_normal(22050) * 3000).astype(np.int16)
    seg_starts, seg_phones = np.array([0, 2205, 11025]), np.array([SILENCE, 5, 9])
    for name in augment.PRESETS:
        preset = augment.get_preset(name)
        augmenter = augment.Augmenter(preset)
        channel = augment.design_channel(rng, preset)
        assert (channel is None) == (name == "none")
        noisy, starts, phones, clean = augmenter(rng, audio, seg_starts, seg_phones, channel, [])
        assert noisy.dtype == np.float32 and len(noisy) == len(clean)
        assert np.all(np.abs(noisy) <= 32768)
        assert starts[0] == 0 and np.all(np.diff(starts) > 0) and starts[-1] < len(noisy)
        assert phones[0] == SILENCE and phones[-1] == SILENCE and phones.tolist()[1:3] == [5, 9]


def test_unknown_preset_is_a_value_error():
    with pytest.raises(ValueError, match="noise"):
        augment.get_preset("extreme")
