"""Every training option, declared once: name, type, default, allowed range, help, Kaldi equivalent.

From :data:`OPTIONS` come the command line and config-file parser (``config.py``),
the validation of every value, and the records the modules take:

* :class:`TrainConfig`     all options (what ``ngsgd-train`` runs with, stored in checkpoints);
* ``network.NetworkConfig``   the architecture (``input_dim``, ``num_classes`` + the "network" group);
* ``optim.OptimizerConfig``   the updater (the "optimizer" group).

Adding an option is one :class:`Option` line in the right group; a module
reads it from the record it already gets.  This module imports only the
standard library and ``faults.py``, so the math modules can use its records.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from .faults import InputError


class ConfigError(InputError):
    """An invalid option value or config file; the message names the option or file."""


@dataclass(frozen=True)
class Option:
    name: str
    kind: type                     # int, float, bool or str
    default: object
    help: str
    group: str = ""                # set by the table below
    kaldi: str = ""                # the Kaldi option (or behaviour) this mirrors
    minimum: float | None = None   # value >= minimum
    above: float | None = None     # value > above
    below: float | None = None     # value < below
    choices: tuple = ()
    required: bool = False         # must be given (no usable default)
    finite: bool = True            # floats: inf is not allowed
    saved: bool = True             # part of the stored train_config (False: how to run, not what)
    fixed: bool = False            # shapes the saved state: --resume needs the checkpoint's value

    def convert(self, value, where: str):
        """``value`` (from YAML, the environment or the command line) as this option's type."""
        if value is None:
            raise ConfigError(f"{where}: option {self.name} needs a value (got null/empty)")
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: option {self.name} must be true or false, got {value!r}")
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise ConfigError(f"{where}: option {self.name} must be a single {self.kind.__name__}, "
                              f"got {value!r}")
        try:
            if self.kind is int and isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return self.kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: option {self.name} must be {_article(self.kind)}, "
                              f"got {value!r}") from None

    def problem(self, value) -> str | None:
        """What is wrong with a converted value (None: nothing)."""
        if self.required and value in (None, ""):
            return "set"
        if value is None:
            return None
        if self.choices and value not in self.choices:
            return f"one of {', '.join(self.choices)}"
        if self.kind is float and self.finite and not math.isfinite(value):
            return "a finite number"
        low = None
        if self.above is not None:
            low = (value > self.above, f"({self.above:g}", "a positive number" if self.above == 0
                   else f"> {self.above:g}")
        elif self.minimum is not None:
            low = (value >= self.minimum, f"[{self.minimum:g}", f">= {self.minimum:g}")
        high = (value < self.below, f"{self.below:g})", f"< {self.below:g}") if self.below is not None else None
        if low and high and not (low[0] and high[0]):
            return f"in {low[1]}, {high[1]}"
        for bound in (low, high):
            if bound and not bound[0]:
                return bound[2]
        return None

    def describe(self) -> str:
        """Help text for ``--help``: the help, the default and the Kaldi equivalent."""
        parts = ([] if self.default is None else [f"default: {self.default!r}"]) \
            + ([f"Kaldi: {self.kaldi}"] if self.kaldi else [])
        return f"{self.help} ({'; '.join(parts)})" if parts else self.help


def _article(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)


def _group(name: str, *options: Option) -> list[Option]:
    return [dataclasses.replace(o, group=name) for o in options]


OPTIONS_LIST: list[Option] = [
    *_group(
        "data",
        Option("train_data", str, None, "training partitions: a directory of train.K.h5 or a glob (quote it)",
               required=True, kaldi="the egs directory"),
        Option("valid_data", str, None, "validation partition file; empty = no validation",
               kaldi="valid_diagnostic.egs"),
        Option("context", int, 4, "frames of context on each side (splicing -c..c)", minimum=0,
               kaldi="--splice-width", fixed=True),
        Option("window_frames", int, 100_000, "frames read and shuffled together (bounds memory per rank)",
               minimum=1, kaldi="nnet-shuffle-egs --buffer-size"),
        Option("prefetch_batches", int, 4, "minibatches prepared ahead by the loader thread", minimum=1),
        Option("input_normalization", bool, True,
               "fixed input transform to zero mean, unit variance from the data",
               kaldi="the fixed input transform of get_lda.sh", fixed=True),
    ),
    *_group(
        "run",
        Option("out_dir", str, "runs/default", "output directory: checkpoints, metrics.jsonl, final model",
               kaldi="the exp directory", required=True),
        Option("device", str, "cpu", "cpu (NumPy) or gpu (CuPy)", choices=("cpu", "gpu"),
               kaldi="--use-gpu"),
        Option("seed", int, 0, "seed for initialisation and shuffling", minimum=0, kaldi="--srand"),
        Option("threads_per_rank", int, 0, "BLAS threads per rank; 0 = this node's cores / ranks on the node",
               minimum=0, kaldi="--num-threads"),
        Option("resume", bool, False, "continue from the newest usable checkpoint in out_dir", saved=False),
        Option("overwrite", bool, False, "start over in an out_dir that holds an earlier run (deletes it; "
               "without this or --resume a non-empty out_dir is refused)", saved=False),
    ),
    *_group(
        "network",
        Option("num_hidden_layers", int, 3, "hidden layers (0: a softmax layer on the input)", minimum=0,
               kaldi="--num-hidden-layers", fixed=True),
        Option("nonlinearity", str, "pnorm", "pnorm or relu", choices=("pnorm", "relu"), fixed=True),
        Option("pnorm_input_dim", int, 3000, "affine output size of each p-norm layer", minimum=1,
               kaldi="--pnorm-input-dim", fixed=True),
        Option("pnorm_output_dim", int, 300, "p-norm output size (groups of input/output)", minimum=1,
               kaldi="--pnorm-output-dim", fixed=True),
        Option("pnorm_p", float, 2.0, "p of the p-norm (>= 1, or inf)", minimum=1, finite=False, kaldi="--p", fixed=True),
        Option("relu_dim", int, 1024, "hidden size for nonlinearity: relu", minimum=1, fixed=True),
    ),
    *_group(
        "optimizer",
        Option("optimizer", str, "ng-online", "sgd, ng-online or ng-simple",
               choices=("sgd", "ng-online", "ng-simple"),
               kaldi="AffineComponent / AffineComponentPreconditionedOnline / AffineComponentPreconditioned",
               fixed=True),
        Option("rank_in", int, 20, "online NG: rank of the input-side Fisher factor", minimum=1,
               kaldi="--rank-in", fixed=True),
        Option("rank_out", int, 80, "online NG: rank of the output-side Fisher factor", minimum=1,
               kaldi="--rank-out", fixed=True),
        Option("update_period", int, 4, "online NG: re-estimate the Fisher factors every this many minibatches",
               minimum=1, kaldi="--update-period"),
        Option("num_samples_history", float, 2000.0, "online NG: forgetting time constant in samples",
               above=0, below=1e6, kaldi="--num-samples-history"),
        Option("alpha", float, 4.0, "online NG: smoothing towards the identity", minimum=0, kaldi="--alpha"),
        Option("max_change_per_sample", float, 0.075, "online NG: per-sample max parameter change (0 = off)",
               minimum=0, kaldi="--max-change-per-sample"),
        Option("ng_schedule", str, "nnet2", "online NG update schedule: nnet2 (paper) or nnet3",
               choices=("nnet2", "nnet3"), kaldi="nnet2 OnlinePreconditioner / nnet3 OnlineNaturalGradient",
               fixed=True),
        Option("simple_alpha", float, 4.0, "simple NG: smoothing towards the identity", above=0,
               kaldi="AffineComponentPreconditioned alpha"),
        Option("max_change", float, 10.0, "simple NG: per-minibatch max parameter change (0 = off)",
               minimum=0, kaldi="--max-change"),
        Option("max_param_change", float, 0.0, "any optimizer: max norm of the change of all parameters "
               "per minibatch, on top of the per-layer limits (0 = off)", minimum=0,
               kaldi="nnet3 --max-param-change"),
    ),
    *_group(
        "schedule",
        Option("minibatch_size", int, 512, "frames per minibatch", minimum=1, kaldi="--minibatch-size"),
        Option("samples_per_average", int, 400_000, "samples per rank between parameter averages", minimum=1,
               kaldi="--samples-per-iter"),
        Option("num_epochs", float, 1.0, "training length in passes over the data (if total_samples is 0)",
               minimum=0, kaldi="--num-epochs"),
        Option("total_samples", int, 0, "training length in samples summed over all ranks", minimum=0),
        Option("lr_initial", float, 0.01, "initial effective learning rate", above=0,
               kaldi="--initial-effective-lrate"),
        Option("lr_final", float, 0.001, "final effective learning rate (geometric decay)", above=0,
               kaldi="--final-effective-lrate"),
        Option("lr_scale_by_ranks", bool, True, "each rank uses N x the effective rate (the paper's rule)",
               kaldi="learning rate x num_jobs"),
        Option("ng_reset_on_average", bool, True, "re-initialise NG state after each average",
               kaldi="nnet2 writes no preconditioner state with the model: every job starts fresh"),
        Option("checkpoint_every", int, 1, "write a checkpoint every this many averages", minimum=1),
        Option("keep_last_k", int, 0, "keep only the newest k checkpoints (0 = keep all)", minimum=0),
        Option("combine_last_k", int, 20, "final model: combination of up to this many last averaged "
               "models of the final depth (0/1 = the last model)", minimum=0,
               kaldi="--max-models-combine"),
        Option("combine_method", str, "best-suffix", "lbfgs: one weight per (model, layer) fitted on "
               "training frames; best-suffix: the best average of the last n on the validation set",
               choices=("lbfgs", "best-suffix"), kaldi="nnet-combine-fast --initial-model=100000 (lbfgs)"),
        Option("combine_frames", int, 10_000, "lbfgs: training frames the combination weights are fitted on",
               minimum=1, kaldi="get_egs2.sh --num-train-frames-combine (combine.egs)"),
        Option("combine_lbfgs_evals", int, 40, "lbfgs: objective evaluations", minimum=1,
               kaldi="nnet-combine-fast --num-lbfgs-iters"),
        Option("normalize_stddev", bool, False, "after the final combination, rescale every hidden affine "
               "layer to parameter stddev 1 (the network's function is unchanged)",
               kaldi="nnet-normalize-stddev"),
    ),
    *_group(
        "recipe",
        Option("ranks_initial", int, 0, "job ramp: ranks that train in the first period, rising to all "
               "ranks by the last; the others idle (0 = all ranks throughout)", minimum=0,
               kaldi="--num-jobs-initial (--num-jobs-final: the number of ranks)"),
        Option("add_layers_period", int, 0, "start with one hidden layer and add one before every this "
               "many periods until num_hidden_layers (0 = off)", minimum=0,
               kaldi="--add-layers-period (nnet-insert)"),
        Option("pick_best_after_growth", bool, True, "add_layers_period: the period that starts with a new "
               "layer ends by taking the best rank (half-size minibatches) instead of averaging",
               kaldi="do_average=false when a layer was just added"),
        Option("prior_scale_power", float, 0.0, "fixed scale of the softmax input: smoothed class prior "
               "to this power, normalised to mean 1 (0 = off)", below=1,
               kaldi="--presoftmax-prior-scale-power (FixedScaleComponent)"),
        Option("lda_transform", bool, False, "LDA-like fixed input transform estimated from the training "
               "data (replaces input_normalization)",
               kaldi="get_lda.sh, nnet-get-feature-transform (FixedAffineComponent)"),
        Option("lda_max_frames", int, 200_000, "lda_transform: statistics from about this many training "
               "frames (every k-th utterance; 0 = all)", minimum=0,
               kaldi="get_lda.sh --num-feats (utterances)"),
    ),
    *_group(
        "safeguards",
        Option("first_period_pick_best", bool, False, "after the first period take the rank with the "
               "best training objective instead of averaging (that period: half-size minibatches)",
               kaldi="iteration 0: best job, no average, minibatch halved"),
        Option("outlier_threshold", float, 1.0, "leave out of an average any rank whose training objective "
               "is this many nats/frame below the best (0 = off)", minimum=0,
               kaldi="nnet3 get_successful_models difference_threshold"),
        Option("max_divergence_retries", int, 3, "redo a diverged period at half the lr at most this many "
               "times in a row, then abort", minimum=0),
        Option("divergence_margin", float, 1.0, "after the first period, a period whose training objective "
               "is worse than a uniform guess (-ln num_classes) by more than this many nats/frame has "
               "diverged (finite divergence)", minimum=0),
        Option("divergence_action", str, "warn", "what a finite divergence does: warn (an event in "
               "metrics.jsonl and on the progress line), rollback (redo the period at half the learning "
               "rate, like a non-finite one) or abort (exit 4)", choices=("warn", "rollback", "abort")),
        Option("signal_check_every", int, 4, "minibatches between checks for a stop signal "
               "(one tiny Allreduce)", minimum=1),
        Option("collective_timeout", float, 600.0, "seconds any collective may wait for every rank (hang "
               "watchdog); then abort naming the missing ranks, exit 3 (0 = no watchdog: wait forever)",
               minimum=0),
        Option("stop_timeout", float, 120.0, "after SIGUSR1/SIGTERM, seconds a rank may wait for the others "
               "in a collective or stay busy between two before the job is aborted (exit 3) instead of "
               "checkpointing (0 = only collective_timeout)", minimum=0),
    ),
]

OPTIONS: dict[str, Option] = {o.name: o for o in OPTIONS_LIST}

# Fields of NetworkConfig that come from the data, not from an option.
DATA_SIZES = [Option("input_dim", int, None, "dimension of the spliced input frames", minimum=1, required=True),
              Option("num_classes", int, None, "number of output classes (pdfs)", minimum=2, required=True)]


def _cross_checks(values: dict) -> list[tuple[str, str]]:
    """(option, what it must be) for rules that involve several options."""
    problems = []
    if "pnorm_input_dim" in values and values["pnorm_input_dim"] % values["pnorm_output_dim"]:
        problems.append(("pnorm_input_dim", f"a multiple of pnorm_output_dim={values['pnorm_output_dim']}"))
    if values.get("resume") and values.get("overwrite"):
        problems.append(("overwrite", "false with resume (continue the run in out_dir, or delete it: not both)"))
    if "total_samples" in values and not (values["total_samples"] > 0 or values["num_epochs"] > 0):
        problems.append(("total_samples", "> 0, or num_epochs > 0 (the training length)"))
    return problems


# ----------------------------------------------------------------------------- records

class _Record:
    """Methods shared by the records below (frozen dataclasses of option values)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """``cls(**d)``, strictly: unknown or missing keys and bad values are a ConfigError."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                raise ConfigError(f"{cls.__name__}: unknown key {key!r} (known: {names})")
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.name not in d:
                raise ConfigError(f"{cls.__name__}: missing required key {f.name!r}")
        return cls(**d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ConfigError naming the first option whose value is out of its declared range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            option = self.__options__[f.name]
            if value is not None and not _has_kind(value, option.kind):
                raise ConfigError(f"option {f.name}: must be {_article(option.kind)}, got {value!r}")
            what = option.problem(value)
            if what:
                raise ConfigError(f"option {f.name}: must be {what}, got {value!r}")
        for name, what in _cross_checks(self.to_dict()):
            raise ConfigError(f"option {name}: must be {what}, got {getattr(self, name)!r}")


def _has_kind(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def record_class(name: str, options: list[Option], leading: list[Option] = (), doc: str = ""):
    """A frozen dataclass with one field per option (the ``leading`` ones first, without
    defaults), validated on creation; a module may subclass it to add methods."""
    fields = [(o.name, o.kind) for o in leading]
    fields += [(o.name, o.kind, dataclasses.field(default=o.default)) for o in options]
    return dataclasses.make_dataclass(
        name, fields, bases=(_Record,), frozen=True,
        namespace={"__doc__": doc, "__module__": __name__,
                   "__options__": {o.name: o for o in [*leading, *options]}})


def in_groups(*groups: str) -> list[Option]:
    return [o for o in OPTIONS_LIST if o.group in groups]


TrainConfig = record_class("TrainConfig", OPTIONS_LIST, doc="Every option of ngsgd-train (see OPTIONS).")


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def add_arguments(parser, options: list[Option]) -> None:
    """One flag per option (``--lr-initial`` and ``--lr_initial``), in argument groups named
    after the options' groups; values stay strings (see :func:`convert_given`) and an option
    not given is absent from the namespace.  A boolean flag alone means true."""
    groups = {}
    for option in options:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group or None)
        flags = [flag(option.name)] + ([f"--{option.name}"] if "_" in option.name else [])
        extra = dict(nargs="?", const="true", metavar="BOOL") if option.kind is bool else {}
        groups[option.group].add_argument(*flags, dest=option.name, default=argparse.SUPPRESS,
                                          choices=option.choices or None, help=option.describe(),
                                          **extra)


def convert_given(given: dict, options: list[Option], where: str = "flag {flag}") -> dict:
    """The options present in ``given`` (an argparse namespace's dict, or other strings),
    converted to their types; ``where`` names the source in errors."""
    by_name = {o.name: o for o in options}
    values = {}
    for name, text in given.items():
        option = by_name.get(name)
        if option is None:
            continue
        if text == "" and option.kind is str and not option.required:
            values[name] = None                  # an empty string clears an optional path
        else:
            values[name] = option.convert(text, where.format(flag=flag(name), name=name))
    return values


def subset(cfg, record_cls, **leading):
    """The ``record_cls`` (e.g. OptimizerConfig) holding ``cfg``'s values of its fields."""
    names = [f.name for f in dataclasses.fields(record_cls)]
    return record_cls(**leading, **{n: getattr(cfg, n) for n in names if n not in leading})


def fixed_differences(saved: dict, cfg) -> list[str]:
    """``option: saved there, current here`` for every ``fixed`` option whose value in a
    checkpoint's stored train_config differs from ``cfg`` (it cannot continue this run)."""
    return [f"{o.name}: {saved[o.name]!r} there, {getattr(cfg, o.name)!r} here" for o in OPTIONS_LIST
            if o.fixed and o.name in saved and saved[o.name] != getattr(cfg, o.name)]


def saved_dict(cfg) -> dict:
    """The options stored with a model (train_config): every ``saved`` option."""
    return {o.name: getattr(cfg, o.name) for o in OPTIONS_LIST if o.saved}
