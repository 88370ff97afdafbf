"""``ngsgd-make-corpus``: a synthetic, licence-free acoustic-model corpus.

Pipeline (docs/corpus.md has the full description):

1. sentences from offline text (:mod:`.text`), split into disjoint train/test pools;
2. ``num_speakers`` training and ``test_speakers`` test voices (:mod:`.voices`),
   each with its own espeak voice file and session channel;
3. per speaker, in a worker process: speak sentences with espeak-ng until the
   speaker's share of ``hours`` is reached, align phones from the PHONEME events
   (:mod:`.labels`), degrade the audio (:mod:`.augment`), compute 40-dim fbank
   and apply the speaker's CMVN (:mod:`.features`);
4. in the parent: stream features into ``OUT_DIR/{train,test}`` Kaldi data
   directories, choose the label inventory from the training alignments and
   write ``ali.ark``/``ali.txt`` and ``phone_text`` (:mod:`.kaldi_dir`);
5. ``OUT_DIR/lang``: the lexicon as espeak spoke the training sentences
   (:mod:`.lexicon`), the topology and the context -> class map of the labels
   (:mod:`.lang`), for ``ngsgd-mkgraph``; ``OUT_DIR/corpus_info.json`` records
   the settings, sizes, speakers and generation speed.

Every random choice of a speaker comes from ``default_rng([seed, speaker
index])`` and every speaker is synthesised in a freshly forked process, so
the corpus depends on ``--seed`` (and the installed text sources and
espeak-ng version) but not on ``--jobs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import multiprocessing
import os
import resource
import sys
import time
import wave
from collections import Counter

import numpy as np

from ngsgd_mpi.corpus import text as text_mod
from ngsgd_mpi.corpus.espeak import EspeakUnavailableError, get_synthesizer
from ngsgd_mpi.corpus.kaldi_dir import KaldiDataDirWriter
from ngsgd_mpi.corpus.labels import LABEL_KINDS, frame_alignment, make_label_set, phone_segments
from ngsgd_mpi.corpus.lang import write_lang
from ngsgd_mpi.corpus.lexicon import LexiconCounts, isolated_pronunciation, word_pronunciations
from ngsgd_mpi.corpus.phones import ACCENTS, PHONES, SILENCE, UnknownPhonemeError
from ngsgd_mpi.corpus.voices import Voice, make_voice_dir, random_voice, remove_voice_dir, write_voice_files

BABBLE_BANK_SIZE = 8


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Settings of one corpus (the CLI options).

    Fields:
      hours:             total audio, train + test, shared equally by all speakers.
      noise:             degradation preset: none, light, medium, heavy.
      labels:            phone (40), phone-state (120) or triphone (~triphone_classes).
      num_speakers:      training speakers.
      test_speakers:     test speakers (disjoint voices, disjoint sentences).
      jobs:              worker processes.
      seed:              seed of every random choice.
      text_sources:      sentence sources, see ngsgd_mpi.corpus.text.
      test_fraction:     share of sentences reserved for the test pool.
      triphone_classes:  maximum number of classes for triphone labels.
      min_class_frames:  training frames a triphone state needs to get its own class.
      accents:           accents voices are drawn from.
      keep_audio:        also write 16-bit 16 kHz wav files and wav.scp.
    """

    hours: float = 1.0
    noise: str = "medium"
    labels: str = "phone"
    num_speakers: int = 40
    test_speakers: int = 8
    jobs: int = 1
    seed: int = 0
    text_sources: tuple[str, ...] = text_mod.DEFAULT_TEXT_SOURCES
    test_fraction: float = 0.1
    triphone_classes: int = 2000
    min_class_frames: int = 20
    accents: tuple[str, ...] = tuple(ACCENTS)
    keep_audio: bool = False

    def validate(self) -> None:
        from ngsgd_mpi.corpus.augment import PRESETS

        if not self.hours > 0:
            raise ValueError(f"hours must be > 0, got {self.hours}")
        if self.noise not in PRESETS:
            raise ValueError(f"noise must be one of {', '.join(PRESETS)}, got {self.noise!r}")
        if self.labels not in LABEL_KINDS:
            raise ValueError(f"labels must be one of {', '.join(LABEL_KINDS)}, got {self.labels!r}")
        if self.num_speakers < 1:
            raise ValueError(f"num_speakers must be >= 1, got {self.num_speakers}")
        if self.test_speakers < 0:
            raise ValueError(f"test_speakers must be >= 0, got {self.test_speakers}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.labels == "triphone" and self.triphone_classes < 120:
            raise ValueError(f"triphone_classes must be >= 120, got {self.triphone_classes}")
        for name in self.text_sources:
            if name not in text_mod.TEXT_SOURCES:
                raise ValueError(f"text_sources must be among {', '.join(text_mod.TEXT_SOURCES)}, "
                                 f"got {name!r}")
        for accent in self.accents:
            if accent not in ACCENTS:
                raise ValueError(f"accents must be among {', '.join(ACCENTS)}, got {accent!r}")


@dataclasses.dataclass(frozen=True)
class SpeakerTask:
    """Work of one speaker, run in a worker.

    Fields:
      voice:          the speaker's Voice.
      voice_path:     its espeak voice file.
      split:          "train" or "test" (which sentence pool to draw from).
      index:          global speaker index (seeds the speaker's random generator).
      target_seconds: audio to produce (stops after the utterance that reaches it).
      seed, noise:    corpus seed and preset name.
      wav_dir:        where to write wav files, or "" for none.
    """

    voice: Voice
    voice_path: str
    split: str
    index: int
    target_seconds: float
    seed: int
    noise: str
    wav_dir: str


# Worker-process state, set once by _init_worker: the sentence pools by split.
_POOLS: dict[str, list[str]] = {}


def _init_worker(pools: dict[str, list[str]]) -> None:
    global _POOLS
    _POOLS = pools


def _write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(np.clip(np.round(audio), -32768, 32767).astype("<i2").tobytes())


def synthesize_speaker(task: SpeakerTask) -> dict:
    """All utterances of one speaker: CMVN'd features, run-length alignments, transcripts.

    Returns a dict with lists ``utt_ids``, ``texts``, ``feats``, ``seg_phones``,
    ``seg_frames``, ``prons`` ([(WORD, phones or None), ...], see :mod:`.lexicon`),
    plus ``seconds`` (audio), ``cpu_seconds`` (this task), ``unknown`` (Counter of unmapped espeak mnemonics) and ``skipped`` (utterances
    dropped for them).
    """
    # Imported by make_corpus() before forking; local so that --help needs no scipy.
    from ngsgd_mpi.corpus.augment import SAMPLE_RATE, Augmenter, design_channel, get_preset
    from ngsgd_mpi.corpus.features import FRAME_LENGTH, FRAME_SHIFT, apply_speaker_cmvn, compute_fbank

    cpu_start = time.process_time()
    synthesizer = get_synthesizer()
    synthesizer.set_voice_file(task.voice_path)
    voice = task.voice
    rng = np.random.default_rng([task.seed, task.index])
    preset = get_preset(task.noise)
    augment = Augmenter(preset)
    channel = design_channel(rng, preset)
    pool = _POOLS[task.split]
    out = {"utt_ids": [], "texts": [], "feats": [], "seg_phones": [], "seg_frames": [], "prons": [],
           "seconds": 0.0, "unknown": Counter(), "skipped": 0}
    babble_bank: list[np.ndarray] = []
    order = rng.permutation(len(pool))
    attempts = 0
    while out["seconds"] < task.target_seconds:
        if attempts >= len(order):
            if not out["utt_ids"]:
                raise RuntimeError(f"speaker {voice.speaker_id}: no sentence of the {task.split} pool "
                                   f"could be aligned; unknown phonemes: {dict(out['unknown'])}")
            order = np.concatenate([order, rng.permutation(len(pool))])  # reuse sentences
        sentence = pool[order[attempts]]
        attempts += 1
        audio, events, words = synthesizer.synthesize(
            sentence, words_per_minute=int(voice.words_per_minute * rng.uniform(0.92, 1.08)),
            pitch=round(50 + 6 * rng.standard_normal()), pitch_range=voice.pitch_range,
            seed=int(rng.integers(2 ** 31)))
        try:
            starts, _, phones = phone_segments(events, len(audio), voice.accent)
        except UnknownPhonemeError as exc:
            out["unknown"].update(exc.mnemonics)
            out["skipped"] += 1
            continue
        noisy, starts16, phones16, clean = augment(rng, audio, starts, phones, channel, babble_bank)
        babble_bank = (babble_bank + [clean])[-BABBLE_BANK_SIZE:]
        feats = compute_fbank(noisy, SAMPLE_RATE)
        seg_phones, seg_frames = frame_alignment(starts16, phones16, len(feats), FRAME_SHIFT, FRAME_LENGTH)
        # Fixed-width numbers keep ids in Kaldi (string) order; utterances last over a second.
        utt_id = f"{voice.speaker_id}-{len(out['utt_ids']):0{max(4, len(str(int(task.target_seconds))))}d}"
        if task.wav_dir:
            _write_wav(os.path.join(task.wav_dir, utt_id + ".wav"), noisy, SAMPLE_RATE)
        out["utt_ids"].append(utt_id)
        out["texts"].append(text_mod.transcript(sentence))
        out["feats"].append(feats)
        out["seg_phones"].append(seg_phones)
        out["seg_frames"].append(seg_frames)
        out["prons"].append((sentence, events, words))
        out["seconds"] += len(noisy) / SAMPLE_RATE
    out["feats"] = apply_speaker_cmvn(out["feats"])
    # Isolated pronunciations only after all synthesis, so the audio cannot depend on them.
    isolated = isolated_pronunciation(synthesizer, voice.accent, {})
    out["prons"] = [word_pronunciations(*spoken, voice.accent, isolated) for spoken in out["prons"]]
    out["cpu_seconds"] = time.process_time() - cpu_start
    return out


def _worker_pool(jobs: int, pools: dict[str, list[str]]):
    """Worker processes, one fresh process per speaker task.

    espeak-ng keeps state from one synthesis to the next (F0 flutter phase,
    voicing phase), so a speaker's audio would depend on which speakers the
    same worker spoke before.  Forking every task from this process -- where
    espeak has been initialised but has never spoken -- makes each speaker's
    audio depend only on the seed.  Where fork is unavailable, spawned workers
    (each initialising espeak once) are reused and results may vary with --jobs.
    """
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork").Pool(
            jobs, initializer=_init_worker, initargs=(pools,), maxtasksperchild=1)
    return multiprocessing.get_context("spawn").Pool(jobs, initializer=_init_worker, initargs=(pools,))


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _disk_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)


def make_corpus(out_dir: str, config: CorpusConfig, log=print) -> dict:
    """Generate the corpus into ``out_dir``/{train,test}; returns the corpus_info dict."""
    config.validate()
    wall_start, cpu_start = time.time(), _cpu_seconds()
    # Import the heavy modules here, so forked workers inherit them instead of each
    # paying about a second of CPU to import scipy.signal and kaldi-native-fbank.
    importlib.import_module("ngsgd_mpi.corpus.augment")
    importlib.import_module("ngsgd_mpi.corpus.features")._import_knf()
    # Fails early, with the install hint, if espeak is missing.  The parent only
    # initialises espeak (never speaks): forked workers start from this state.
    synthesizer = get_synthesizer()
    sentences, sources_used = text_mod.load_sentences(config.text_sources)
    train_pool, test_pool = text_mod.split_train_test(sentences, config.test_fraction)
    if not train_pool or (config.test_speakers and not test_pool):
        raise ValueError(f"text_sources {list(config.text_sources)} gave {len(train_pool)} train and "
                         f"{len(test_pool)} test sentences; need at least one of each")
    log(f"sentences: {len(train_pool)} train, {len(test_pool)} test (sources: {', '.join(sources_used)})")

    splits = [("train", "s", config.num_speakers), ("test", "t", config.test_speakers)]
    total_speakers = config.num_speakers + config.test_speakers
    target_seconds = config.hours * 3600.0 / total_speakers
    voices, task_splits = [], []
    digits = max(3, len(str(total_speakers)))
    for split, prefix, count in splits:
        for i in range(count):
            index = len(voices)
            voices.append(random_voice(np.random.default_rng([config.seed, index, 1]),
                                       f"{prefix}{i + 1:0{digits}d}", config.accents))
            task_splits.append(split)

    os.makedirs(out_dir, exist_ok=True)
    writers = {split: KaldiDataDirWriter(os.path.join(out_dir, split))
               for split, _, count in splits if count}
    voice_dir = make_voice_dir()
    try:
        voice_paths = write_voice_files(voices, synthesizer.data_dir, voice_dir)
        tasks = []
        for index, (voice, split) in enumerate(zip(voices, task_splits)):
            wav_dir = ""
            if config.keep_audio:
                wav_dir = os.path.join(writers[split].data_dir, "wav")
                os.makedirs(wav_dir, exist_ok=True)
            tasks.append(SpeakerTask(voice, voice_paths[voice.speaker_id], split, index, target_seconds,
                                     config.seed, config.noise, wav_dir))
        pools = {"train": train_pool, "test": test_pool}
        alignments: dict[str, list] = {"train": [], "test": []}
        stats = {split: {"utterances": 0, "frames": 0, "seconds": 0.0} for split in pools}
        unknown: Counter = Counter()
        lexicon = LexiconCounts()
        skipped = 0
        worker_cpu = 0.0
        pool = _worker_pool(config.jobs, pools)
        results = pool.imap(synthesize_speaker, tasks)
        try:
            for task, result in zip(tasks, results):
                writer = writers[task.split]
                for utt_id, text, feats, seg_phones, seg_frames, prons in zip(
                        result["utt_ids"], result["texts"], result["feats"],
                        result["seg_phones"], result["seg_frames"], result["prons"]):
                    writer.add_features(utt_id, task.voice.speaker_id, text, feats)
                    writer.add_phone_text(utt_id, [PHONES[p] for p in seg_phones if p != SILENCE])
                    alignments[task.split].append((utt_id, seg_phones, seg_frames))
                    stats[task.split]["frames"] += len(feats)
                    if task.split == "train":
                        lexicon.add_utterance(prons)
                stats[task.split]["utterances"] += len(result["utt_ids"])
                stats[task.split]["seconds"] += result["seconds"]
                unknown.update(result["unknown"])
                skipped += result["skipped"]
                worker_cpu += result["cpu_seconds"]
                log(f"  {task.voice.speaker_id} ({task.split}, {task.voice.accent}, "
                    f"{'klatt' + str(task.voice.klatt) if task.voice.klatt else 'wavegen'}): "
                    f"{len(result['utt_ids'])} utterances, {result['seconds']:.0f} s")
        finally:
            pool.close()
            pool.join()
    finally:
        remove_voice_dir(voice_dir)

    label_set = make_label_set(config.labels, [(p, f) for _, p, f in alignments["train"]],
                               config.triphone_classes, config.min_class_frames)
    spk2gender = {v.speaker_id: v.gender for v in voices}
    class_counts = np.zeros(label_set.num_classes, dtype=np.int64)
    for split, writer in writers.items():
        for utt_id, seg_phones, seg_frames in alignments[split]:
            labels = label_set.frame_labels(seg_phones, seg_frames)
            writer.add_alignment(utt_id, labels)
            if split == "train":
                class_counts += np.bincount(labels, minlength=label_set.num_classes)
        writer.close(label_set.class_names, {s: g for s, g in spk2gender.items()
                                             if s in set(writer.utt2spk.values())})
        if config.keep_audio:
            with open(os.path.join(writer.data_dir, "wav.scp"), "w", encoding="utf-8") as f:
                f.writelines(f"{u} {os.path.join(writer.data_dir, 'wav', u + '.wav')}\n"
                             for u in writer.utt2spk)

    lexicon_entries = lexicon.entries()
    write_lang(os.path.join(out_dir, "lang"), label_set, lexicon_entries)

    wall = time.time() - wall_start
    cpu = _cpu_seconds() - cpu_start   # parent + joined workers, text loading and writing included
    audio_hours = sum(s["seconds"] for s in stats.values()) / 3600.0
    disk = _disk_bytes(out_dir)
    info = {
        "config": {**dataclasses.asdict(config), "text_sources": list(config.text_sources),
                   "accents": list(config.accents)},
        "text_sources_used": sources_used,
        "sentences": {"train_pool": len(train_pool), "test_pool": len(test_pool)},
        "splits": {split: {**stats[split], "hours": stats[split]["seconds"] / 3600.0}
                   for split in writers},
        "label_kind": config.labels,
        "num_classes": label_set.num_classes,
        "train_classes_seen": int(np.count_nonzero(class_counts)),
        "sample_rate": 16000,
        "frame_shift_ms": 10,
        "feature_dim": 40,
        "lexicon": {"words": len({e[0] for e in lexicon_entries}), "pronunciations": len(lexicon_entries),
                    "train_words_without_pronunciation": lexicon.words_without_pronunciation},
        "unknown_phonemes": dict(sorted(unknown.items())),
        "utterances_skipped_for_unknown_phonemes": skipped,
        "speakers": {v.speaker_id: {**dataclasses.asdict(v), "split": s}
                     for v, s in zip(voices, task_splits)},
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "synthesis_cpu_seconds": worker_cpu,
        "hours_per_cpu_minute": audio_hours / (cpu / 60.0) if cpu > 0 else None,
        "disk_bytes": disk,
        "disk_mb_per_hour": disk / 1e6 / audio_hours if audio_hours else None,
    }
    with open(os.path.join(out_dir, "corpus_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    if unknown:
        log(f"WARNING: {skipped} utterance(s) skipped for espeak phonemes missing from the phone map: "
            f"{dict(unknown)}")
    log(f"done: {audio_hours:.3f} h of audio in {wall:.1f} s wall, {cpu:.1f} s CPU "
        f"({info['hours_per_cpu_minute']:.2f} h/CPU-minute), {disk / 1e6:.1f} MB, "
        f"{label_set.num_classes} {config.labels} classes")
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ngsgd-make-corpus",
        description="Synthesise a licence-free English acoustic-model corpus with espeak-ng and write "
                    "Kaldi data directories OUT_DIR/train and OUT_DIR/test (40-dim fbank + CMVN, "
                    "frame alignments). Needs: apt-get install espeak-ng (libespeak-ng1, "
                    "espeak-ng-data); optional text: apt-get install fortunes wamerican.")
    d = CorpusConfig()
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory")
    parser.add_argument("--hours", type=float, default=d.hours,
                        help="total hours of audio, train + test (default %(default)s)")
    parser.add_argument("--noise", default=d.noise, choices=["none", "light", "medium", "heavy"],
                        help="degradation preset (default %(default)s)")
    parser.add_argument("--labels", default=d.labels, choices=list(LABEL_KINDS),
                        help="frame labels: phone (40), phone-state (120), triphone (default %(default)s)")
    parser.add_argument("--num-speakers", type=int, default=d.num_speakers,
                        help="training speakers (default %(default)s)")
    parser.add_argument("--test-speakers", type=int, default=d.test_speakers,
                        help="test speakers, disjoint from training (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: number of CPUs)")
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    parser.add_argument("--text-sources", default=",".join(d.text_sources),
                        help=f"comma-separated sentence sources among {','.join(text_mod.TEXT_SOURCES)} "
                             f"(default %(default)s; missing ones are skipped)")
    parser.add_argument("--accents", default=",".join(d.accents),
                        help="comma-separated espeak accents to draw voices from (default: all English)")
    parser.add_argument("--triphone-classes", type=int, default=d.triphone_classes,
                        help="maximum classes for --labels triphone (default %(default)s)")
    parser.add_argument("--min-class-frames", type=int, default=d.min_class_frames,
                        help="training frames a triphone state needs for its own class (default %(default)s)")
    parser.add_argument("--keep-audio", action="store_true", help="also write wav files and wav.scp")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = CorpusConfig(
        hours=args.hours, noise=args.noise, labels=args.labels, num_speakers=args.num_speakers,
        test_speakers=args.test_speakers, jobs=args.jobs, seed=args.seed,
        text_sources=tuple(s for s in args.text_sources.split(",") if s),
        accents=tuple(a for a in args.accents.split(",") if a),
        triphone_classes=args.triphone_classes, min_class_frames=args.min_class_frames,
        keep_audio=args.keep_audio)
    try:
        make_corpus(args.out_dir, config)
    except (EspeakUnavailableError, ValueError, ImportError, RuntimeError) as exc:
        print(f"ngsgd-make-corpus: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
