"""Tests of alignment and label sets (ngsgd_mpi/corpus/labels.py)."""

import numpy as np
import pytest

from ngsgd_mpi.corpus.labels import LabelSet, frame_alignment, make_label_set, phone_segments, state_of_frames
from ngsgd_mpi.corpus.phones import PHONE_INDEX, UnknownPhonemeError

P = PHONE_INDEX


def test_segments_cover_audio_with_leading_silence_and_merged_pauses():
    events = [(100, "h"), (300, "@"), (500, "l"), (700, "oU"), (900, "_:"), (950, "_")]
    starts, ends, phones = phone_segments(events, 1000, "en-us")
    assert starts.tolist() == [0, 100, 300, 500, 700, 900]
    assert ends.tolist() == [100, 300, 500, 700, 900, 1000]
    assert phones.tolist() == [P["sil"], P["HH"], P["AH"], P["L"], P["OW"], P["sil"]]


def test_zero_length_phoneme_shares_the_span_before_it():
    # "sells": espeak folds the l into the end of the vowel: E at 100, l and z both at 300.
    events = [(0, "s"), (100, "E"), (300, "l"), (300, "z"), (400, "_")]
    starts, ends, phones = phone_segments(events, 400, "en-us")
    assert phones.tolist() == [P["S"], P["EH"], P["L"], P["Z"]]
    assert starts.tolist() == [0, 100, 200, 300]
    assert ends.tolist() == [100, 200, 300, 400]


def test_multi_phone_mnemonic_is_split_equally():
    starts, _, phones = phone_segments([(0, "f"), (100, "aI3"), (400, "_:")], 500, "en-us")
    assert phones.tolist() == [P["F"], P["AY"], P["ER"], P["sil"]]
    assert starts.tolist() == [0, 100, 250, 400]


def test_unknown_phoneme_raises():
    with pytest.raises(UnknownPhonemeError):
        phone_segments([(0, "s"), (10, "Q!")], 100, "en-us")


def test_frame_alignment_uses_frame_centres_and_drops_empty_segments():
    # Segments in samples: sil [0, 305), S [305, 310) (no frame centre in it), AA [310, 1200).
    seg_starts, seg_phones = np.array([0, 305, 310]), np.array([P["sil"], P["S"], P["AA"]])
    # Frames of shift 100, length 200: centres 100, 200, 300, ..., 1000.
    phones, frames = frame_alignment(seg_starts, seg_phones, 10, frame_shift=100, frame_length=200)
    assert phones.tolist() == [P["sil"], P["AA"]]
    assert frames.tolist() == [3, 7]


def test_states_split_segments_in_three():
    assert state_of_frames([6, 2, 1]).tolist() == [0, 0, 1, 1, 2, 2, 0, 1, 0]


def test_phone_and_phone_state_labels():
    seg_phones, seg_frames = np.array([P["sil"], P["AA"], P["sil"]]), np.array([3, 4, 2])
    phone = make_label_set("phone")
    assert phone.num_classes == 40
    assert phone.frame_labels(seg_phones, seg_frames).tolist() == [0] * 3 + [P["AA"]] * 4 + [0] * 2
    state = make_label_set("phone-state")
    assert state.num_classes == 120
    aa = 3 * P["AA"]
    assert state.frame_labels(seg_phones, seg_frames).tolist() == \
        [0, 1, 2, aa, aa, aa + 1, aa + 2, 0, 1]


def test_triphone_inventory_keeps_frequent_contexts_and_backs_off_rare_ones():
    frequent = (np.array([P["sil"], P["K"], P["AE"], P["T"], P["sil"]]), np.array([3, 3, 6, 3, 3]))
    rare = (np.array([P["sil"], P["B"], P["AE"], P["D"], P["sil"]]), np.array([3, 3, 6, 3, 3]))
    label_set = make_label_set("triphone", [frequent] * 10 + [rare], num_classes=125, min_frames=5)
    assert label_set.num_classes == 125
    # The K-AE+T states (20 frames each) outrank everything; singletons are below min_frames.
    assert "K-AE+T_0" in label_set.class_names and not any("B-AE+D" in n for n in label_set.class_names)
    labels = label_set.frame_labels(*frequent)
    assert labels[6] == label_set.class_names.index("K-AE+T_0")
    assert labels[0] == 0                            # silence stays context independent
    rare_labels = label_set.frame_labels(*rare)
    # B-AE+D was seen once (below min_frames): its frames back off to AE_0, AE_1, AE_2.
    assert rare_labels[6:12].tolist() == [3 * P["AE"]] * 2 + [3 * P["AE"] + 1] * 2 + [3 * P["AE"] + 2] * 2


def test_triphone_inventory_is_capped_and_validated():
    data = [(np.array([0, p, q, 0]), np.array([3, 3, 3, 3])) for p in range(1, 40) for q in range(1, 40)]
    label_set = make_label_set("triphone", data, num_classes=500, min_frames=1)
    assert label_set.num_classes == 500
    with pytest.raises(ValueError, match="num_classes"):
        make_label_set("triphone", data, num_classes=100)
    with pytest.raises(ValueError, match="labels"):
        LabelSet("senone", ["a"])
