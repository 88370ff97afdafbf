"""ngsgd-forward and ngsgd-eval: run a trained model over features.

Forward (``ngsgd-forward``) writes, per utterance, a (frames x classes) float32 matrix as a
Kaldi archive (kaldi/tables.py), in input order:

* ``log-posterior``: ``log p(s | x_t)``, the network output; ``posterior``: ``p(s | x_t)``;
* ``log-likelihood``: the hybrid pseudo log-likelihood ``log p(s | x_t) - k log p(s)`` with the
  model's priors and the rule for classes without training frames (priors.py, P1-P3; ``k`` =
  ``--prior-scale``).  This is what ``latgen-faster-mapped`` expects.

Input: ``--data DATA_DIR`` reads DATA/feats.scp through the input pipeline the model remembers
(per-speaker CMVN from DATA/cmvn.scp + utt2spk with the training options,
kaldi/pipeline.py); ``--feats`` takes any rspecifier (or a partition .h5) as it is.  Then
frames are spliced with the model's own context, exactly as in training (edge frames
repeated), normalised as in training, and run in batches of about ``--batch-frames`` rows that
may span several utterances.  Every layer works row by row, so a row's value depends on its
batch only through BLAS summation order (differences up to a few 1e-6).

``--out ark:-`` writes the archive, and only the archive, to standard output: every message of
these tools goes to standard error.

Several ranks (``mpiexec -n N ngsgd-forward ...``) take utterances round-robin (rank r:
utterances r, r+N, ...).  Each rank writes ``out.<r>.ark`` (and ``out.<r>.scp``); rank 0 then
writes the requested scp with every utterance in input order, pointing into the per-rank arks.

Evaluation (``ngsgd-eval``) reports the objective (mean log-probability of the correct class
per frame), frame accuracy and per-class accuracy (``evaluation.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from . import backend, data, evaluation, priors
from .faults import EXIT_OK, InputError, report_bad_input
from .kaldi.pipeline import Features, data_dir_features
from .kaldi.tables import (INT_VECTOR, IndexedTable, TableWriter, output_files, parse_wspecifier,
                           rank_path, rank_wspecifier)
from .model import Model
from .utterances import Checks, SkipReport, check_utterance

OUTPUTS = ("log-posterior", "posterior", "log-likelihood")


class InferenceError(InputError):
    """Bad input to ngsgd-forward / ngsgd-eval."""


def to_stderr(message: str) -> None:
    sys.stderr.write(message + "\n")


# --------------------------------------------------------------------------- model and features

def load_model(path: str, context: int | None = None) -> Model:
    """The model file at ``path``, with ``context`` (if given) replacing its own; it must
    divide the model's input dimension."""
    model = Model.load(path)
    if context is None:
        return model
    width = 2 * context + 1
    if context < 0 or model.network_config.input_dim % width:
        raise InferenceError(f"{path}: input_dim {model.network_config.input_dim} is not a multiple of "
                             f"2 * context + 1 = {width} (context {context})")
    return model.replace(context=context)


def read_utterances(feats: str, rank: int = 0, size: int = 1):
    """(utt_id, features) of utterances rank, rank + size, ... of a partition file (.h5) or a
    Kaldi feature rspecifier, streamed, used as they are."""
    if feats.endswith(".h5"):
        yield from data.read_utterances(feats, rank, size)
        return
    table = Features(feats, "--feats", random_access=False)
    try:
        yield from table.items(rank, size)
    finally:
        table.close()


def model_utterances(model: Model, model_path: str, feats: str | None = None, data_dir: str | None = None,
                     rank: int = 0, size: int = 1, log=to_stderr):
    """(utt_id, features) as the model expects them: ``data_dir`` through the model's input
    pipeline (CMVN per speaker), or ``feats`` as they are."""
    if (feats is None) == (data_dir is None):
        raise InferenceError("give exactly one of --data DATA_DIR and --feats FEATS")
    pipeline = model.input_pipeline
    if data_dir is not None:
        if pipeline is None:
            raise InferenceError(f"{model_path}: the model does not say which input pipeline it was trained "
                                 f"with (a checkpoint, or a model from before pipelines were stored); "
                                 f"use --feats with features prepared as for training")
        table = data_dir_features(data_dir, pipeline.cmvn, random_access=False)
        try:
            yield from table.items(rank, size)
        finally:
            table.close()
        return
    if pipeline is not None and pipeline.cmvn is not None and rank == 0:
        log(f"note: {model_path} was trained on features with {pipeline.describe()}; --feats is used "
            f"as it is (--data DATA_DIR applies the model's CMVN)")
    yield from read_utterances(feats, rank, size)


def batches(utterances, context: int, batch_frames: int):
    """Group (utt_id, feats, extra) items into spliced batches of about ``batch_frames`` rows;
    yields (items, X) with X's rows in item order."""
    offsets = data.splice_offsets(context, context)
    pending, frames = [], 0
    for item in utterances:
        pending.append(item)
        frames += len(item[1])
        if frames >= batch_frames:
            yield pending, np.concatenate([data.splice_utterance(i[1], offsets) for i in pending])
            pending, frames = [], 0
    if pending:
        yield pending, np.concatenate([data.splice_utterance(i[1], offsets) for i in pending])


def log_posteriors(network, X: np.ndarray, batch_frames: int) -> np.ndarray:
    """Host float32 log p(s | x) for the rows of X, at most ``batch_frames`` rows per pass."""
    out = np.empty((len(X), network.config.num_classes), np.float32)
    for start in range(0, len(X), batch_frames):
        stop = min(start + batch_frames, len(X))
        out[start:stop] = backend.to_host(network.log_probs(backend.to_device(X[start:stop])))
    return out


def log_prior_offsets(model: Model, model_path: str, prior_scale: float = 1.0, prior_floor: float = 1e-10,
                      log=to_stderr) -> np.ndarray:
    """What log-likelihood output subtracts from log p(s | x) (priors.py, P1-P3): the model's
    averaged-posterior priors, or, without them, its label frequencies (with a note)."""
    if not prior_floor >= 0 or not np.isfinite(prior_scale):
        raise InferenceError(f"--prior-floor must be >= 0 and --prior-scale finite, got {prior_floor}, "
                             f"{prior_scale}")
    if model.posterior_priors is not None:
        prior = model.posterior_priors
    elif model.class_priors is not None:
        prior = model.class_priors
        log(f"note: {model_path} has no averaged-posterior priors (a checkpoint, or an older model): "
            f"dividing by the training label frequencies")
    else:
        raise InferenceError(f"{model_path}: no priors stored; use --output log-posterior")
    return priors.log_prior_offsets(prior, model.class_counts, prior_scale, prior_floor)


def _check_dim(utt_id: str, feats, feat_dim: int, where: str) -> None:
    if feats.shape[1] != feat_dim and len(feats):
        raise InferenceError(f"{where}: utterance {utt_id!r} has {feats.shape[1]}-dim features, the "
                             f"model expects {feat_dim}")


def _checked(utterances, feat_dim: int, where: str):
    """(utt_id, feats, None) items with the model's feature dimension (an empty utterance
    becomes a (0, feat_dim) matrix and gets a 0-row output)."""
    for utt_id, feats in utterances:
        _check_dim(utt_id, feats, feat_dim, where)
        yield utt_id, (feats if len(feats) else np.zeros((0, feat_dim), np.float32)), None


def score_utterances(model: Model, network, utterances, output: str, offsets=None, batch_frames: int = 8192,
                     where: str = "features"):
    """(utt_id, (frames, classes) float32) for every (utt_id, features) of ``utterances``:
    ``output`` of OUTPUTS; ``offsets`` from :func:`log_prior_offsets` for log-likelihoods."""
    for group, X in batches(_checked(utterances, model.feat_dim, where), model.context, batch_frames):
        out = log_posteriors(network, X, batch_frames)
        if output == "log-likelihood":
            out -= offsets
        elif output == "posterior":
            np.exp(out, out=out)
        start = 0
        for utt_id, utt_feats, _ in group:
            yield utt_id, out[start:start + len(utt_feats)]
            start += len(utt_feats)


# --------------------------------------------------------------------------- forward

def forward(model: str, feats: str | None, wspecifier: str, output: str = "log-posterior",
            prior_scale: float = 1.0, prior_floor: float = 1e-10, context: int | None = None,
            batch_frames: int = 8192, rank: int = 0, size: int = 1, data_dir: str | None = None,
            log=to_stderr) -> dict:
    """Write this rank's share of the per-utterance outputs; returns {"utterances",
    "frames", "wspecifier"} of what this rank wrote.  With size > 1 the file names get
    ``.<rank>`` (see the module docstring).  Nothing is left behind on an error."""
    if output not in OUTPUTS:
        raise InferenceError(f"--output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if batch_frames < 1:
        raise InferenceError(f"--batch-frames must be >= 1, got {batch_frames}")
    wspecifier, _ = rank_wspecifier(wspecifier, rank, size)
    loaded = load_model(model, context)
    network = loaded.network()
    offsets = None
    if output == "log-likelihood":
        offsets = log_prior_offsets(loaded, model, prior_scale, prior_floor, log if rank == 0 else _quiet)
    utterances = model_utterances(loaded, model, feats, data_dir, rank, size, log)
    num_utts = num_frames = 0
    with TableWriter(wspecifier) as writer:
        for utt_id, matrix in score_utterances(loaded, network, utterances, output, offsets, batch_frames,
                                               feats or data_dir):
            writer.write(utt_id, matrix)
            num_utts += 1
            num_frames += len(matrix)
    return {"utterances": num_utts, "frames": num_frames, "wspecifier": wspecifier}


def _quiet(message: str) -> None:
    pass


def merge_rank_scps(scp: str, size: int) -> None:
    """Write ``scp`` from out.<r>.scp, r < size, in input order (utterance i is line i // size
    of rank i % size's file)."""
    per_rank = []
    for r in range(size):
        with open(rank_path(scp, r), encoding="utf-8") as f:
            per_rank.append(f.readlines())
    total = sum(len(lines) for lines in per_rank)
    tmp = f"{scp}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(total):
            f.write(per_rank[i % size][i // size])
    os.replace(tmp, scp)


# --------------------------------------------------------------------------- evaluation

def evaluate(model: str, data_path: str, ali: str | None = None, context: int | None = None,
             batch_frames: int = 8192, length_tolerance: int = 2) -> dict:
    """Objective, frame accuracy and per-class accuracy of ``model`` on a partition file, or on
    Kaldi features (an rspecifier, or a data directory read through the model's input pipeline)
    with an alignment of class ids (utterances that ngsgd-prepare would skip are skipped and
    counted the same way)."""
    loaded = load_model(model, context)
    network = loaded.network()
    num_classes = loaded.network_config.num_classes
    result = {"model": model, "data": data_path}
    if data_path.endswith(".h5"):
        info = data.open_partition(data_path, feat_dim=loaded.feat_dim, num_classes=num_classes)
        scores = evaluation.evaluate_partition(network, info, loaded.context, batch_frames)
    else:
        if ali is None:
            raise InferenceError("--ali is needed with Kaldi features (or give a partition .h5)")
        report = SkipReport()
        checks = Checks(num_classes, length_tolerance, float("inf"))
        alignment = IndexedTable(ali, INT_VECTOR, "--ali")
        try:
            alignment.index()
            utterances = model_utterances(loaded, model, data_dir=data_path) if os.path.isdir(data_path) \
                else read_utterances(data_path)
            usable = _labelled_utterances(utterances, alignment, checks, report, loaded.feat_dim, data_path)
            num_utts = 0

            def blocks():
                nonlocal num_utts
                for group, X in batches(usable, loaded.context, batch_frames):
                    num_utts += len(group)
                    yield X, np.concatenate([labels for _, _, labels in group])
            scores = evaluation.evaluate(network, blocks())
            scores.utterances = num_utts
        finally:
            alignment.close()
        result.update(report.to_dict())
    result.update(frames=scores.frames, utterances=scores.utterances, objective=scores.objective,
                  frame_accuracy=scores.accuracy, per_class=scores.per_class())
    return result


def _labelled_utterances(utterances, alignment, checks, report, feat_dim, where):
    """(utt_id, feats, labels) of the utterances that pass ngsgd-prepare's checks."""
    for utt_id, feats in utterances:
        if utt_id not in alignment:
            report.skip(utt_id, "missing_labels", "has features but no alignment")
            continue
        _check_dim(utt_id, feats, feat_dim, where)
        labels = alignment.read(utt_id)
        n = check_utterance(utt_id, feats, labels, checks, report)
        if n is not None:
            yield utt_id, feats[:n], labels[:n]


def format_result(result: dict) -> str:
    lines = [f"model {result['model']}", f"data  {result['data']}",
             f"utterances {result['utterances']:,}, frames {result['frames']:,}",
             f"objective (log-prob/frame) {result['objective']:.6f}",
             f"frame accuracy             {100 * result['frame_accuracy']:.2f} %"]
    if result.get("skipped"):
        lines.append("skipped utterances: " + ", ".join(f"{n} {r}" for r, n in result["skipped"].items()))
    lines.append(f"{'class':>7} {'frames':>10} {'accuracy':>9}")
    for row in result["per_class"]:
        if row["frames"]:
            lines.append(f"{row['class']:>7} {row['frames']:>10,} {100 * row['accuracy']:>8.2f}%")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry points

def forward_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ngsgd-forward", description="model + features -> per-utterance "
                                "log-posteriors, posteriors or pseudo log-likelihoods as a Kaldi archive")
    p.add_argument("--model", required=True, help="model file (final.h5 or a checkpoint's model.h5)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="Kaldi data directory: feats.scp through the model's input pipeline "
                        "(per-speaker CMVN from cmvn.scp + utt2spk)")
    source.add_argument("--feats", help="any feature rspecifier (scp:, ark:, 'ark:cmd |', ark:-, .gz) or a "
                        "partition .h5, used as it is")
    p.add_argument("--out", required=True, help="Kaldi wspecifier, e.g. ark,scp:out.ark,out.scp or ark:-")
    p.add_argument("--output", choices=OUTPUTS, default="log-posterior")
    p.add_argument("--prior-scale", type=float, default=1.0,
                   help="log-likelihood = log-posterior - scale * log-prior")
    p.add_argument("--prior-floor", type=float, default=1e-10, help="classes whose training frequency is "
                   "below this are disabled in log-likelihood output (nnet1's rule)")
    p.add_argument("--context", type=int, default=None, help="splicing context (default: the model's)")
    p.add_argument("--batch-frames", type=int, default=8192, help="frames per forward pass")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    return p


def forward_main(argv=None) -> int:
    from . import distributed  # noqa: PLC0415

    args = forward_parser().parse_args(argv)
    dist = distributed.init()
    with distributed.abort_on_exception(dist, prog="ngsgd-forward"):
        backend.use_device(args.device)
        try:
            summary = dist.agree(lambda: forward(
                args.model, args.feats, args.out, args.output, args.prior_scale, args.prior_floor,
                args.context, args.batch_frames, dist.rank, dist.size, data_dir=args.data))
        except InputError as exc:
            _remove_output(args.out, dist)     # another rank may have failed after this one finished
            return report_bad_input("ngsgd-forward", exc, speak=dist.rank == 0)
        files = output_files(*parse_wspecifier(args.out))
        if dist.rank == 0 and dist.size > 1 and "scp" in files:
            merge_rank_scps(files["scp"], dist.size)
        totals = dist.sum([summary["utterances"], summary["frames"]])
        if dist.rank == 0:
            ranks = f" ({dist.size} ranks: per-rank arks {rank_path(files['ark'], 0)} ...)" \
                if dist.size > 1 else ""
            to_stderr(f"ngsgd-forward: {int(totals[0]):,} utterances, {int(totals[1]):,} frames, "
                      f"{args.output} -> {args.out}{ranks}")
    return EXIT_OK


def _remove_output(wspecifier: str, dist) -> None:
    try:
        files = rank_wspecifier(wspecifier, dist.rank, dist.size)[1]
    except InputError:
        return                          # a malformed --out: nothing was written
    for path in files:
        if os.path.isfile(path):
            os.remove(path)


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ngsgd-eval", description="frame accuracy, objective and "
                                "per-class accuracy of a model")
    p.add_argument("--model", required=True, help="model file")
    p.add_argument("--data", required=True, help="a partition .h5, a feature rspecifier, or a Kaldi data "
                   "directory (read through the model's input pipeline), with --ali")
    p.add_argument("--ali", help="alignment of class ids for Kaldi features (an int32-vector rspecifier)")
    p.add_argument("--context", type=int, default=None, help="splicing context (default: the model's)")
    p.add_argument("--batch-frames", type=int, default=8192, help="frames per forward pass")
    p.add_argument("--length-tolerance", type=int, default=2,
                   help="feature/label length difference trimmed away (larger: utterance skipped)")
    p.add_argument("--json", help="also write the result as JSON here")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    return p


def eval_main(argv=None) -> int:
    args = eval_parser().parse_args(argv)
    backend.use_device(args.device)
    try:
        result = evaluate(args.model, args.data, args.ali, args.context, args.batch_frames,
                          args.length_tolerance)
    except InputError as exc:
        return report_bad_input("ngsgd-eval", exc)
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return EXIT_OK


def main(argv=None) -> int:
    """``python -m ngsgd_mpi.inference forward|eval ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("forward", "eval"):
        sys.stderr.write("usage: python -m ngsgd_mpi.inference {forward,eval} ...\n")
        return 2
    return (forward_main if argv[0] == "forward" else eval_main)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
