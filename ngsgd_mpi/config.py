"""Training configuration: one flat namespace from YAML file, environment and CLI.

Precedence: command line > environment (``NGSGD_<OPTION>``, e.g.
``NGSGD_LR_INITIAL``) > config file (``--config x.yaml``, flat YAML whose keys
are the option names with underscores) > defaults below.  Every option is a
CLI flag, spelled with dashes or underscores (``--lr-initial``/``--lr_initial``).
"""

from __future__ import annotations

import math
import os
import re

import configargparse
import yaml

# name: (type, default, help).  The order is the order of ``--help``.
OPTIONS: dict[str, tuple] = {
    # data and run
    "train_data": (str, None, "training partitions: a glob (quote it) or a directory of *.h5"),
    "valid_data": (str, None, "validation file (same HDF5 format); empty = no validation"),
    "out_dir": (str, "runs/default", "output directory: checkpoints, metrics.jsonl, final model"),
    "device": (str, "cpu", "cpu (NumPy) or gpu (CuPy)"),
    "seed": (int, 0, "seed for initialisation and shuffling"),
    "threads_per_rank": (int, 0, "BLAS threads per rank; 0 = this node's cores / ranks on the node"),
    "context": (int, 4, "frames of context on each side (splicing -c..c)"),
    "window_frames": (int, 100_000, "frames read and shuffled together (bounds memory per rank)"),
    "prefetch_batches": (int, 4, "minibatches prepared ahead by the loader thread"),
    # network
    "num_hidden_layers": (int, 3, "hidden layers"),
    "nonlinearity": (str, "pnorm", "pnorm or relu"),
    "pnorm_input_dim": (int, 3000, "affine output size of each p-norm layer"),
    "pnorm_output_dim": (int, 300, "p-norm output size (groups of input/output)"),
    "pnorm_p": (float, 2.0, "p of the p-norm (1, 2, inf)"),
    "relu_dim": (int, 1024, "hidden size for nonlinearity: relu"),
    "input_normalization": (bool, True, "fixed input transform to zero mean, unit variance from the data"),
    # optimiser
    "optimizer": (str, "ng-online", "sgd, ng-online or ng-simple"),
    "rank_in": (int, 20, "online NG: rank of the input-side Fisher factor"),
    "rank_out": (int, 80, "online NG: rank of the output-side Fisher factor"),
    "update_period": (int, 4, "online NG: re-estimate the Fisher factors every this many minibatches"),
    "num_samples_history": (float, 2000.0, "online NG: forgetting time constant in samples"),
    "alpha": (float, 4.0, "online NG: smoothing towards the identity"),
    "max_change_per_sample": (float, 0.075, "online NG: per-sample max parameter change (0 = off)"),
    "ng_schedule": (str, "nnet2", "online NG update schedule: nnet2 (paper) or nnet3"),
    "simple_alpha": (float, 4.0, "simple NG: smoothing towards the identity"),
    "max_change": (float, 10.0, "simple NG: per-minibatch max parameter change (0 = off)"),
    "max_param_change": (float, 0.0, "any optimizer: max norm of the change of all parameters per "
                                     "minibatch, on top of the per-layer limits (0 = off)"),
    # schedule and averaging
    "minibatch_size": (int, 512, "frames per minibatch"),
    "samples_per_average": (int, 400_000, "samples per rank between parameter averages"),
    "num_epochs": (float, 1.0, "training length in passes over the data (if total_samples is 0)"),
    "total_samples": (int, 0, "training length in samples summed over all ranks"),
    "lr_initial": (float, 0.01, "initial effective learning rate"),
    "lr_final": (float, 0.001, "final effective learning rate (geometric decay)"),
    "lr_scale_by_ranks": (bool, True, "each rank uses N x the effective rate (the paper's rule)"),
    "ng_reset_on_average": (bool, False, "re-initialise NG state after each average (as Kaldi)"),
    "checkpoint_every": (int, 1, "write a checkpoint every this many averages"),
    "keep_last_k": (int, 0, "keep only the newest k checkpoints (0 = keep all)"),
    "combine_last_k": (int, 20, "final model: best average of up to this many last averaged "
                                "models on the validation set (0/1 = the last model)"),
    # safeguards and faults
    "first_period_pick_best": (bool, False, "after the first period take the rank with the best "
                                            "training objective instead of averaging (Kaldi iter 0)"),
    "outlier_threshold": (float, 1.0, "leave out of an average any rank whose training objective is "
                                      "this many nats/frame below the best (0 = off)"),
    "max_divergence_retries": (int, 3, "redo a diverged period at half the lr at most this many "
                                       "times in a row, then abort"),
    "signal_check_every": (int, 4, "minibatches between checks for a stop signal (one tiny Allreduce)"),
    "collective_timeout": (float, 600.0, "seconds to wait for every rank before an average; then "
                                         "abort naming the missing ranks (0 = wait forever)"),
}

CHOICES = {"device": ("cpu", "gpu"), "nonlinearity": ("pnorm", "relu"),
           "optimizer": ("sgd", "ng-online", "ng-simple"), "ng_schedule": ("nnet2", "nnet3")}


class ConfigError(ValueError):
    """An invalid configuration; the message names the option or file."""


def _parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise configargparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> configargparse.ArgParser:
    parser = configargparse.ArgParser(
        prog="ngsgd-train", description="Train a DNN with NG-SGD and MPI parameter averaging.",
        config_file_parser_class=configargparse.YAMLConfigFileParser,
        auto_env_var_prefix="NGSGD_", formatter_class=configargparse.ArgumentDefaultsHelpFormatter)
    parser.add("-c", "--config", is_config_file=True, help="flat YAML config file")
    parser.add("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    for name, (kind, default, text) in OPTIONS.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        if kind is bool:
            parser.add(*flags, dest=name, type=_parse_bool, default=default, metavar="BOOL", help=text)
        else:
            parser.add(*flags, dest=name, type=kind, default=default, choices=CHOICES.get(name), help=text)
    return parser


def check_config_file(path: str) -> None:
    """Reject what configargparse would misread: nesting and unknown keys."""
    try:
        with open(path) as f:
            content = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
    if content is None:
        return
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path}: expected a flat mapping of option: value")
    for key, value in content.items():
        name = str(key).replace("-", "_")
        if name not in OPTIONS:
            raise ConfigError(f"config file {path}: unknown key {key!r} "
                              f"(see ngsgd-train --help for the options)")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config file {path}: key {key!r} must be a single value (files are flat)")


def validate(cfg) -> None:
    """Range checks that the types alone do not catch."""
    def need(cond, name, what):
        if not cond:
            raise ConfigError(f"option {name}: must be {what}, got {getattr(cfg, name)!r}")

    need(bool(cfg.train_data), "train_data", "set (glob or directory of partitions)")
    for name in ("lr_initial", "lr_final"):
        need(getattr(cfg, name) > 0 and math.isfinite(getattr(cfg, name)), name, "a positive number")
    for name in ("rank_in", "rank_out", "update_period", "minibatch_size", "samples_per_average",
                 "num_hidden_layers", "pnorm_input_dim", "pnorm_output_dim", "relu_dim",
                 "window_frames", "prefetch_batches", "checkpoint_every", "signal_check_every"):
        need(getattr(cfg, name) >= 1, name, ">= 1")
    for name in ("context", "threads_per_rank", "keep_last_k", "total_samples", "combine_last_k",
                 "max_divergence_retries"):
        need(getattr(cfg, name) >= 0, name, ">= 0")
    for name in ("alpha", "simple_alpha", "max_change_per_sample", "max_change", "max_param_change",
                 "num_epochs",
                 "outlier_threshold", "collective_timeout"):
        need(getattr(cfg, name) >= 0, name, ">= 0")
    need(0 < cfg.num_samples_history < 1e6, "num_samples_history", "in (0, 1e6)")
    need(cfg.pnorm_p >= 1, "pnorm_p", ">= 1 (or inf)")
    need(cfg.pnorm_input_dim % cfg.pnorm_output_dim == 0, "pnorm_input_dim",
         f"a multiple of pnorm_output_dim={cfg.pnorm_output_dim}")
    need(cfg.total_samples > 0 or cfg.num_epochs > 0, "total_samples",
         "> 0, or num_epochs > 0 (the training length)")


def parse(argv=None):
    """Parse and validate; raises ConfigError (bad file or value) or SystemExit (bad flag)."""
    import argparse  # noqa: PLC0415

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        check_config_file(known.config)
    cfg = build_parser().parse_args(argv)
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    """The resolved training options (what is printed and stored in checkpoints)."""
    return {name: getattr(cfg, name) for name in OPTIONS}


def format_resolved(cfg) -> str:
    return "\n".join(f"  {name}: {getattr(cfg, name)!r}" for name in OPTIONS)


def train_paths(pattern: str) -> list[str]:
    """Partition files from a glob or a directory, in natural order (train.2 before
    train.10; partition order decides which rank reads which file)."""
    import glob  # noqa: PLC0415

    def natural(path):
        return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path)]

    found = glob.glob(os.path.join(pattern, "*.h5")) if os.path.isdir(pattern) else glob.glob(pattern)
    paths = sorted(found, key=natural)
    if not paths:
        raise ConfigError(f"option train_data: no partition files match {pattern!r}")
    return paths
