"""The input pipeline a model remembers, and the CMVN stage of it for Kaldi data directories.

What a frame goes through before the network sees it, in order::

    1. CMVN per speaker       apply-cmvn --norm-means=M --norm-vars=V \\
                                  --utt2spk=ark:DATA/utt2spk scp:DATA/cmvn.scp scp:DATA/feats.scp
                              (kaldi.feats.apply_cmvn; options from ALI_DIR/cmvn_opts, as nnet2's
                              train_pnorm_fast.sh reads them; empty = Kaldi's defaults, means only)
    2. splicing +-context     Model.context (edge frames repeated, never across utterances)
    3. normalisation          Model.input_mean / input_std (per spliced dimension, from training)

Stage 1 is described by :class:`InputPipeline` (``cmvn``: None = features used as read) and
travels from ``ngsgd-prepare`` (``OUT/train/pipeline.json``, beside the partitions) into the
model file (``meta.input_pipeline``), so ``ngsgd-forward --data DATA_DIR`` applies to new data
exactly what training saw.  Stages 2 and 3 are in the model file already.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..faults import InputError
from .feats import CmvnError, apply_cmvn, parse_cmvn_opts
from .tables import MATRIX, IndexedTable, SequentialTable, as_feature_matrix, read_text_map

PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "ngsgd_mpi.input-pipeline"
TARGETS = ("pdf", "phone", "labels")


class PipelineError(InputError):
    """A data directory or pipeline description that cannot be used (names the file)."""


@dataclass(frozen=True)
class Cmvn:
    """apply-cmvn's options."""
    norm_means: bool = True
    norm_vars: bool = False

    def options(self) -> str:
        return f"--norm-means={str(self.norm_means).lower()} --norm-vars={str(self.norm_vars).lower()}"


@dataclass(frozen=True)
class InputPipeline:
    """How features were turned into training frames before splicing.

    ``cmvn``: per-speaker CMVN from the data directory's cmvn.scp (None: features as read);
    ``targets``: what the classes are ("pdf": pdf-ids, "phone": phone ids, "labels": as given)."""
    cmvn: Cmvn | None = None
    targets: str = "labels"

    def to_dict(self) -> dict:
        cmvn = None if self.cmvn is None else {"norm_means": self.cmvn.norm_means,
                                               "norm_vars": self.cmvn.norm_vars}
        return {"format": PIPELINE_FORMAT, "cmvn": cmvn, "targets": self.targets}

    @classmethod
    def from_dict(cls, d, where: str) -> "InputPipeline":
        """The pipeline of a dict written by :meth:`to_dict`; PipelineError naming ``where``."""
        if not isinstance(d, dict) or d.get("format") != PIPELINE_FORMAT \
                or set(d) != {"format", "cmvn", "targets"}:
            raise PipelineError(f"{where}: not an input-pipeline record (expected keys format, cmvn, "
                                f"targets with format {PIPELINE_FORMAT!r})")
        cmvn = d["cmvn"]
        if cmvn is not None:
            if not isinstance(cmvn, dict) or set(cmvn) != {"norm_means", "norm_vars"} \
                    or not all(isinstance(v, bool) for v in cmvn.values()):
                raise PipelineError(f"{where}: 'cmvn' must be null or {{norm_means: bool, norm_vars: bool}}")
            if cmvn["norm_vars"] and not cmvn["norm_means"]:
                raise PipelineError(f"{where}: 'cmvn': norm_vars needs norm_means (as apply-cmvn)")
            cmvn = Cmvn(**cmvn)
        if d["targets"] not in TARGETS:
            raise PipelineError(f"{where}: 'targets' must be one of {', '.join(TARGETS)}")
        return cls(cmvn, d["targets"])

    def describe(self) -> str:
        cmvn = "no CMVN" if self.cmvn is None else f"per-speaker CMVN ({self.cmvn.options()})"
        return f"{cmvn}, targets: {self.targets}"


def read_cmvn_opts(path: str) -> Cmvn:
    """The options of a Kaldi ``cmvn_opts`` file; a missing or empty file means Kaldi's
    defaults (means only), as in nnet2's scripts."""
    if not os.path.isfile(path):
        return Cmvn()
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        return Cmvn(*parse_cmvn_opts(text, path))
    except CmvnError as exc:
        raise PipelineError(str(exc)) from None


def write_pipeline(directory: str, pipeline: InputPipeline) -> None:
    """``directory/pipeline.json``, atomically."""
    path = os.path.join(directory, PIPELINE_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(pipeline.to_dict(), f, indent=1)
    os.replace(tmp, path)


def read_pipeline(directory: str) -> InputPipeline | None:
    """The pipeline.json in ``directory`` (None when there is none)."""
    path = os.path.join(directory, PIPELINE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc})") from None
    return InputPipeline.from_dict(d, path)


# --------------------------------------------------------------------------- a data directory

class SpeakerCmvn:
    """apply-cmvn with per-speaker statistics: DATA/cmvn.scp (2 x (D+1) stats by speaker) and
    DATA/utt2spk.  Without utt2spk, cmvn.scp is keyed by utterance (apply-cmvn without
    --utt2spk).  An utterance without a speaker, or a speaker without statistics, is an error."""

    def __init__(self, data_dir: str, cmvn: Cmvn):
        self.cmvn = cmvn
        self.cmvn_scp = os.path.join(data_dir, "cmvn.scp")
        if not os.path.isfile(self.cmvn_scp):
            raise PipelineError(f"{self.cmvn_scp} does not exist (compute it with "
                                f"steps/compute_cmvn_stats.sh, or pass --no-cmvn)")
        utt2spk = os.path.join(data_dir, "utt2spk")
        self.utt2spk_path = utt2spk if os.path.isfile(utt2spk) else None
        self.utt2spk = read_text_map(utt2spk, "utt2spk") if self.utt2spk_path else None
        table = IndexedTable(f"scp:{self.cmvn_scp}", MATRIX, "cmvn.scp")
        try:
            self.stats = {spk: np.asarray(stats, np.float64) for spk, stats in table.items()}
        finally:
            table.close()

    def __call__(self, utt_id: str, feats: np.ndarray) -> np.ndarray:
        if self.utt2spk is None:
            speaker = utt_id
        elif utt_id in self.utt2spk:
            speaker = self.utt2spk[utt_id]
        else:
            raise PipelineError(f"{self.utt2spk_path}: no speaker for utterance {utt_id!r}")
        if speaker not in self.stats:
            whose = f"speaker {speaker!r} (of utterance {utt_id!r})" if self.utt2spk is not None \
                else f"utterance {utt_id!r}"
            raise PipelineError(f"{self.cmvn_scp}: no CMVN statistics for {whose}")
        try:
            return apply_cmvn(feats, self.stats[speaker], self.cmvn.norm_means, self.cmvn.norm_vars)
        except CmvnError as exc:
            raise PipelineError(f"{self.cmvn_scp}: speaker {speaker!r}: {exc}") from None


class Features:
    """Float32 features by utterance from an rspecifier, through an optional per-utterance
    transform (CMVN).  :meth:`items` streams them once; with ``random_access`` the table is
    indexed on the way (spooling streams into ``workdir``) so that :meth:`read` works after."""

    def __init__(self, spec: str, what: str = "--feats", transform=None, workdir: str | None = None,
                 random_access: bool = True):
        self.table = IndexedTable(spec, MATRIX, what, workdir) if random_access \
            else SequentialTable(spec, MATRIX, what)
        self.spec, self.name, self.transform = self.table.spec, self.table.name, transform

    def _prepared(self, key: str, matrix) -> np.ndarray:
        feats = as_feature_matrix(key, matrix, self.name)
        return feats if self.transform is None or not len(feats) else self.transform(key, feats)

    def items(self, rank: int = 0, size: int = 1):
        """(utt_id, features) of utterances rank, rank + size, ... in table order."""
        if isinstance(self.table, IndexedTable):
            entries = self.table.items(rank, size)
        else:
            entries = ((key, value) for key, value, _ in self.table.entries(rank, size))
        for key, matrix in entries:
            yield key, self._prepared(key, matrix)

    def read(self, key: str) -> np.ndarray:
        return self._prepared(key, self.table.read(key))

    def close(self) -> None:
        self.table.close()


def data_dir_features(data_dir: str, cmvn: Cmvn | None, workdir: str | None = None,
                      random_access: bool = True) -> Features:
    """DATA/feats.scp, with per-speaker CMVN unless ``cmvn`` is None."""
    feats_scp = os.path.join(data_dir, "feats.scp")
    if not os.path.isdir(data_dir):
        raise PipelineError(f"--data {data_dir}: not a directory")
    if not os.path.isfile(feats_scp):
        raise PipelineError(f"--data {data_dir}: {feats_scp} does not exist")
    transform = SpeakerCmvn(data_dir, cmvn) if cmvn is not None else None
    return Features(f"scp:{feats_scp}", "--data", transform, workdir, random_access)
