"""Final model combination: the best average of the last n averaged models.

Late in training the per-period models wander around a minimum; averaging the last few of
them usually beats the last one (Kaldi's ``nnet-combine-fast`` learns one weight per model
and layer; this is the simpler "best suffix average" that nnet3's combination falls back to).
Candidates are the averages of the last n = 1..K checkpointed models; the one with the best
validation log-probability per frame wins (ties go to fewer models).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from . import backend, checkpoint, data, evaluation, priors
from .faults import EXIT_OK, InputError, report_bad_input
from .model import Model


def combine_checkpoints(out_dir: str, valid: data.PartitionInfo, max_models: int, log=print):
    """(params, n) of the best candidate, or None when there is no averaged checkpoint."""
    averaged = checkpoint.averaged_checkpoints(out_dir)[-max_models:]
    if not averaged:
        return None
    newest = Model.load(averaged[-1].model_path)
    network = newest.network()
    total = np.zeros(network.params.size, np.float64)
    best = None
    for n, ckpt in enumerate(reversed(averaged), start=1):       # newest first: suffix averages
        total += Model.load(ckpt.model_path).params
        candidate = (total / n).astype(np.float32)
        network.params[...] = backend.to_device(candidate)
        result = evaluation.evaluate_partition(network, valid, newest.context)
        log(f"combine: average of the last {n:2d} model(s) (from period {ckpt.period}): "
            f"valid {result.objective:.4f} ({100 * result.accuracy:.2f}%)")
        if best is None or result.objective > best[0]:
            best = (result.objective, candidate, n)
    return best[1], best[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ngsgd-combine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="training output directory (with checkpoints/)")
    parser.add_argument("--valid-data", required=True, help="validation partition file")
    parser.add_argument("--max-models", type=int, default=20, help="consider the last this many models")
    parser.add_argument("--output", help="combined model file (default OUT_DIR/combined.h5)")
    parser.add_argument("--train-data", help="training partitions for the priors (default: the run's)")
    args = parser.parse_args(argv)
    try:
        valid = data.open_partition(args.valid_data)
        result = combine_checkpoints(args.out_dir, valid, args.max_models)
        if result is None:
            raise checkpoint.CheckpointError(f"{args.out_dir}: no complete averaged checkpoint found")
        params, n = result
        newest = checkpoint.averaged_checkpoints(args.out_dir)[-1]
        output = args.output or os.path.join(args.out_dir, "combined.h5")
        combined = Model.load(newest.model_path).replace(
            params=params, info={"combined_models": n, "period": newest.period})
        train_data = args.train_data or combined.train_config.get("train_data")
        try:
            combined = priors.finalize(combined, train_data)
        except InputError as exc:
            sys.stderr.write(f"ngsgd-combine: note: no nnet2 priors ({exc}); log-likelihood output "
                             f"will use the label frequencies\n")
        combined.save(output)
    except InputError as exc:
        return report_bad_input("ngsgd-combine", exc)
    print(f"ngsgd-combine: wrote {output} (average of the last {n} model(s))")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
