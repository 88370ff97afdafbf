"""Tests of the espeak -> ARPAbet phone map (ngsgd_mpi/corpus/phones.py)."""

import os

import numpy as np
import pytest

from ngsgd_mpi.corpus import phones, text
from ngsgd_mpi.corpus.espeak import espeak_available


def require_espeak():
    """Skip without espeak-ng, except in CI, where it must be installed."""
    if not espeak_available():
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is not installed in CI: apt-get install libespeak-ng1 espeak-ng-data")
        pytest.skip("espeak-ng library not installed")


def test_phone_set_is_arpabet39_plus_silence():
    assert len(phones.PHONES) == 40 and phones.PHONES[phones.SILENCE] == "sil"
    assert len(set(phones.PHONES)) == 40


def test_every_target_is_a_phone_and_every_phone_is_reachable():
    targets = [p for table in (phones.ESPEAK_TO_ARPABET, phones.RHOTIC_OVERRIDES)
               for mapped in table.values() for p in mapped]
    assert set(targets) <= set(phones.PHONES)
    assert set(targets) == set(phones.PHONES)


def test_rhotic_accents_colour_vowels_non_rhotic_do_not():
    assert phones.phone_table("en-us")["e@"] == ("EH", "R")
    assert phones.phone_table("en-gb")["e@"] == ("EH",)
    assert phones.phone_table("en-us")["3"] == ("ER",)
    assert phones.phone_table("en-gb-x-rp")["3"] == ("AH",)
    assert phones.phone_table("en-us")["aa"] == ("AE",)
    assert phones.phone_table("en-gb")["aa"] == ("AA",)


def test_explicit_r_after_r_coloured_vowel_is_labelled_once():
    # Scottish "air" arrives as e@ r: EH R, not EH R R.
    assert phones.map_phonemes(["e@", "r"], "en-gb-scotland") == [("EH",), ("R",)]
    assert phones.map_phonemes(["e@", "z"], "en-us") == [("EH", "R"), ("Z",)]


def test_unknown_mnemonics_are_reported_not_dropped():
    with pytest.raises(phones.UnknownPhonemeError) as info:
        phones.map_phonemes(["h", "@", "Q!", "l", "zz"], "en-us")
    assert info.value.mnemonics == ["Q!", "zz"]
    with pytest.raises(ValueError, match="accent"):
        phones.phone_table("fr")


def test_map_covers_every_phoneme_espeak_emits_for_the_text_used():
    require_espeak()
    from ngsgd_mpi.corpus import voices
    from ngsgd_mpi.corpus.espeak import get_synthesizer

    synthesizer = get_synthesizer()
    sentences = text.pydoc_sentences()
    if text.source_available("fortunes"):
        sentences += text.fortune_sentences()
    rng = np.random.default_rng(0)
    sample = [sentences[i] for i in rng.choice(len(sentences), size=160, replace=False)]
    accents = list(phones.ACCENTS)
    speakers = [voices.random_voice(rng, f"v{i}", accents=(a,)) for i, a in enumerate(accents)]
    voice_dir = voices.make_voice_dir()
    try:
        paths = voices.write_voice_files(speakers, synthesizer.data_dir, voice_dir)
        unknown, seen = _collect_phonemes(synthesizer, sample, speakers, paths)
    finally:
        voices.remove_voice_dir(voice_dir)
    assert not unknown, f"espeak phonemes missing from the phone map: {unknown}"
    assert len(seen) > 40   # the sample really exercised the inventory


def _collect_phonemes(synthesizer, sample, speakers, paths):
    unknown, seen = {}, set()
    for i, sentence in enumerate(sample):
        speaker = speakers[i % len(speakers)]
        accent = speaker.accent
        synthesizer.set_voice_file(paths[speaker.speaker_id])
        _, events, _ = synthesizer.synthesize(sentence)
        table = phones.phone_table(accent)
        for _, mnemonic in events:
            seen.add(mnemonic)
            if mnemonic not in table:
                unknown.setdefault(mnemonic, (accent, sentence))
    return unknown, seen
