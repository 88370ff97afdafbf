"""ngsgd-forward and ngsgd-eval: run a trained model over features.

Forward (``ngsgd-forward``) writes, per utterance, a (frames x classes) float32 matrix as a
Kaldi ark/scp (kaldiio):

* ``log-posterior``: ``log p(s | x_t)``, the network output;
* ``log-likelihood``: the hybrid pseudo log-likelihood
  ``log p(x_t | s) = log p(s | x_t) - log p(s) + log p(x_t)``; the last term is the same for
  every state of a frame, so it is dropped, as Kaldi's ``DecodableAmNnet`` /
  ``nnet3-compute --use-priors`` do.  ``p(s)`` is the model file's ``class_priors`` (training
  label frequencies), floored at ``--prior-floor`` (not renormalised) so an unseen class
  cannot give ``log 0``.  This is what ``latgen-faster-mapped`` expects.

Frames are spliced with the model's own context, exactly as in training (edge frames
repeated), and run in batches of about ``--batch-frames`` rows that may span several
utterances.  Every layer works row by row, so a row's value does not depend on the other
rows in its batch beyond BLAS summation order (differences up to a few 1e-6).

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

from . import backend, data, evaluation
from .faults import EXIT_OK, InputError, report_bad_input
from .kaldi.tables import (AlignmentTable, KaldiTable, as_feature_matrix, kaldiio_module, output_files,
                           parse_wspecifier, rank_path, rank_wspecifier, strip_rspecifier)
from .model import Model
from .utterances import Checks, SkipReport, check_utterance

OUTPUTS = ("log-posterior", "log-likelihood")


class InferenceError(InputError):
    """Bad input to ngsgd-forward / ngsgd-eval."""


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
    Kaldi feature table (scp/ark)."""
    if feats.endswith(".h5"):
        yield from data.read_utterances(feats, rank, size)
        return
    table = KaldiTable(feats)
    try:
        for key, matrix in table.items(rank, size):
            yield key, as_feature_matrix(key, matrix, table.path)
    finally:
        table.close()


def splice_utterance(feats: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(T, F) -> (T, F * len(offsets)) float32, edge frames repeated (as training)."""
    num_frames = len(feats)
    if num_frames == 0:
        return np.zeros((0, feats.shape[1] * len(offsets)), np.float32)
    feats = np.asarray(feats, np.float32)
    return data.splice(feats, np.arange(num_frames), np.zeros(num_frames, np.int64),
                       np.full(num_frames, num_frames), offsets)


def batches(utterances, context: int, batch_frames: int):
    """Group (utt_id, feats, extra) items into spliced batches of about ``batch_frames`` rows;
    yields (items, X) with X's rows in item order."""
    offsets = data.splice_offsets(context, context)
    pending, frames = [], 0
    for item in utterances:
        pending.append(item)
        frames += len(item[1])
        if frames >= batch_frames:
            yield pending, np.concatenate([splice_utterance(i[1], offsets) for i in pending])
            pending, frames = [], 0
    if pending:
        yield pending, np.concatenate([splice_utterance(i[1], offsets) for i in pending])


def log_posteriors(network, X: np.ndarray, batch_frames: int) -> np.ndarray:
    """Host float32 log p(s | x) for the rows of X, at most ``batch_frames`` rows per pass."""
    out = np.empty((len(X), network.config.num_classes), np.float32)
    for start in range(0, len(X), batch_frames):
        stop = min(start + batch_frames, len(X))
        out[start:stop] = backend.to_host(network.log_probs(backend.to_device(X[start:stop])))
    return out


def log_priors(priors, prior_floor: float) -> np.ndarray:
    """log(max(prior, floor)) of the model's class priors."""
    if not prior_floor > 0:
        raise InferenceError(f"--prior-floor must be > 0, got {prior_floor}")
    return np.log(np.maximum(np.asarray(priors, np.float64), prior_floor)).astype(np.float32)


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


# --------------------------------------------------------------------------- forward

def forward(model: str, feats: str, wspecifier: str, output: str = "log-posterior",
            prior_floor: float = 1e-8, context: int | None = None, batch_frames: int = 8192,
            rank: int = 0, size: int = 1) -> dict:
    """Write this rank's share of the per-utterance outputs; returns {"utterances",
    "frames", "wspecifier"} of what this rank wrote.  With size > 1 the file names get
    ``.<rank>`` (see the module docstring)."""
    kaldiio = kaldiio_module()
    if output not in OUTPUTS:
        raise InferenceError(f"--output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if batch_frames < 1:
        raise InferenceError(f"--batch-frames must be >= 1, got {batch_frames}")
    wspecifier, files = rank_wspecifier(wspecifier, rank, size)
    loaded = load_model(model, context)
    network = loaded.network()
    subtract = None
    if output == "log-likelihood":
        if loaded.class_priors is None:
            raise InferenceError(f"{model}: no class_priors stored; use --output log-posterior")
        subtract = log_priors(loaded.class_priors, prior_floor)
    if not feats.endswith(".h5") and not os.path.isfile(strip_rspecifier(feats)[0]):
        raise InferenceError(f"--feats {feats}: file does not exist")

    num_utts = num_frames = 0
    try:
        with kaldiio.WriteHelper(wspecifier) as writer:
            for group, X in batches(_checked(read_utterances(feats, rank, size), loaded.feat_dim, feats),
                                    loaded.context, batch_frames):
                out = log_posteriors(network, X, batch_frames)
                if subtract is not None:
                    out -= subtract
                start = 0
                for utt_id, utt_feats, _ in group:
                    writer(utt_id, out[start:start + len(utt_feats)])
                    start += len(utt_feats)
                    num_utts += 1
                num_frames += len(X)
    except BaseException:
        for f in files:             # no partial output
            if os.path.isfile(f):
                os.remove(f)
        raise
    return {"utterances": num_utts, "frames": num_frames, "wspecifier": wspecifier}


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
    Kaldi features with an alignment (utterances that ngsgd-prepare would skip are skipped and
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
        alignment = AlignmentTable(ali)
        try:
            usable = _labelled_utterances(read_utterances(data_path), alignment, checks, report,
                                          loaded.feat_dim, data_path)
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
                                "log-posteriors or pseudo log-likelihoods as a Kaldi ark/scp")
    p.add_argument("--model", required=True, help="model file (final.h5 or a checkpoint's model.h5)")
    p.add_argument("--feats", required=True, help="feats.scp, an .ark, or a partition .h5")
    p.add_argument("--out", required=True, help="Kaldi wspecifier, e.g. ark,scp:out.ark,out.scp")
    p.add_argument("--output", choices=OUTPUTS, default="log-posterior")
    p.add_argument("--prior-floor", type=float, default=1e-8, help="floor of the class priors")
    p.add_argument("--context", type=int, default=None, help="splicing context (default: the model's)")
    p.add_argument("--batch-frames", type=int, default=8192, help="frames per forward pass")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    return p


def forward_main(argv=None) -> int:
    from . import distributed  # noqa: PLC0415

    args = forward_parser().parse_args(argv)
    dist = distributed.init()
    with distributed.abort_on_exception(dist):
        backend.use_device(args.device)
        try:
            summary = dist.agree(lambda: forward(args.model, args.feats, args.out, args.output,
                                                 args.prior_floor, args.context, args.batch_frames,
                                                 dist.rank, dist.size))
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
            print(f"ngsgd-forward: {int(totals[0]):,} utterances, {int(totals[1]):,} frames, "
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
    p.add_argument("--data", required=True, help="a partition .h5, or feats.scp/.ark with --ali")
    p.add_argument("--ali", help="alignment for Kaldi features (int32-vector ark/scp or text)")
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
