"""Final model combination: the best average of the last n averaged models.

Late in training the per-period models wander around a minimum; averaging
the last few of them usually beats the last one (Kaldi's
``nnet-combine-fast`` learns one weight per model and layer; this is the
simpler "best suffix average" that nnet3's combination falls back to).
Candidates are the averages of the last n = 1..K checkpointed models; the
one with the best validation log-probability per frame wins (ties go to
fewer models).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from . import backend, checkpoint, data


def combine_checkpoints(out_dir: str, valid: data.PartitionInfo, max_models: int, log=print):
    """(params, n) of the best candidate, or None when there is no averaged checkpoint."""
    averaged = checkpoint.averaged_checkpoints(out_dir)[-max_models:]
    if not averaged:
        return None
    from .trainer import evaluate_file  # noqa: PLC0415 - shared evaluation loop

    network, _, attrs = checkpoint.load_network(os.path.join(averaged[-1].path, "model.h5"))
    context = int(attrs["train_config"].get("context", 4))
    total = np.zeros(network.params.size, np.float64)
    best = None
    for n, ckpt in enumerate(reversed(averaged), start=1):       # newest first: suffix averages
        arrays, _ = checkpoint.load_model_file(os.path.join(ckpt.path, "model.h5"))
        total += arrays["params"]
        candidate = (total / n).astype(np.float32)
        network.params[...] = backend.to_device(candidate)
        obj, acc = evaluate_file(network, valid, context)
        log(f"combine: average of the last {n:2d} model(s) (from period {ckpt.period}): "
            f"valid {obj:.4f} ({100 * acc:.2f}%)")
        if best is None or obj > best[0]:
            best = (obj, candidate, n)
    return best[1], best[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ngsgd-combine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="training output directory (with checkpoints/)")
    parser.add_argument("--valid-data", required=True, help="validation partition file")
    parser.add_argument("--max-models", type=int, default=20, help="consider the last this many models")
    parser.add_argument("--output", help="combined model file (default OUT_DIR/combined.h5)")
    args = parser.parse_args(argv)
    try:
        valid = data.open_partition(args.valid_data)
        result = combine_checkpoints(args.out_dir, valid, args.max_models)
        if result is None:
            raise checkpoint.CheckpointError(f"{args.out_dir}: no complete averaged checkpoint found")
        params, n = result
        src = checkpoint.averaged_checkpoints(args.out_dir)[-1]
        arrays, attrs = checkpoint.load_model_file(os.path.join(src.path, "model.h5"))
        output = args.output or os.path.join(args.out_dir, "combined.h5")
        checkpoint.save_model(output, params, attrs["network_config"], attrs["train_config"],
                              input_mean=arrays.get("input_mean"), input_std=arrays.get("input_std"),
                              class_counts=arrays.get("class_counts"),
                              extra_attrs={"combined_models": n, "period": src.period})
    except (data.DataError, checkpoint.CheckpointError) as exc:
        sys.stderr.write(f"ngsgd-combine: error: {exc}\n")
        return 2
    print(f"ngsgd-combine: wrote {output} (average of the last {n} model(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
