"""The SPMD training driver: every rank runs :func:`train`; read it top to bottom.

Each active rank trains its own copy of the network on its own partitions for a *period*
(``schedule.Plan``: which ranks train, how deep the network is, the learning rate), then the
ranks combine their parameters (``averaging.combine_ranks``: one Allreduce of the flat
buffer, or the best rank's model) and continue from the result.

Kaldi's nnet2 recipe around the optimizer (configs/kaldi_nnet2_pnorm.yaml switches it all on):
the job ramp (``ranks_initial``; idle ranks wait in the period's collectives), pick-best
periods with half-size minibatches (``first_period_pick_best``, and after each new layer),
layer-wise growth (``add_layers_period``: a new network and updater, see
``network.insert_hidden_layer``), the LDA-like input transform (``lda_transform``) and the
pre-softmax prior scale (``prior_scale_power``) estimated in :func:`initial_model`, and the
final combination (``combine_method``).

Faults (docs/reliability.md):
* Bad input anywhere (config, out_dir, partitions, device, checkpoints) -> every rank finds
  out together (``dist.agree``) before anything is written; one line, exit 2.
* SIGUSR1/SIGTERM on any rank -> at the next check (every ``signal_check_every``
  minibatches; one tiny Allreduce) all ranks write a checkpoint of exactly where they are
  and exit with EXIT_STOPPED (75); the same command with ``--resume`` continues
  bit-identically.
* A non-finite objective or parameters on any rank -> every rank restores the period's
  starting parameters and optimizer state and redoes the period at half the learning rate;
  ``max_divergence_retries`` in a row -> exit EXIT_DIVERGED.  A period (after the first)
  whose training objective ends far worse than chance is a *finite* divergence:
  ``divergence_action`` warns (default), rolls back the same way, or aborts.
* Every collective is watched (``distributed.Watchdog``): a rank that does not arrive within
  ``collective_timeout`` seconds gets the job aborted with EXIT_RANK_LOST, naming it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import averaging, backend, checkpoint, combine, config, data, evaluation, lda, priors
from .faults import EXIT_DIVERGED, EXIT_OK, EXIT_STOPPED, AgreedInputError, DivergedError, InputError, \
    StopRequest, report_bad_input
from .kaldi.pipeline import read_pipeline
from .metrics import MetricsLog
from .model import Model
from .network import Network, NetworkConfig, insert_hidden_layer, presoftmax_prior_scale
from .optim import OptimizerConfig, make_updater
from .options import ConfigError, fixed_differences, subset
from .schedule import Plan

STOP, DIVERGED = 1, 2          # bits of the flag word the ranks agree on


@dataclass
class Progress:
    """Where this rank is: saved in its state file, restored on resume."""
    period: int = 0            # averages completed
    samples: int = 0           # samples processed by all ranks before the current period
    batch: int = 0             # minibatches done in the current period
    epoch: int = 0             # data cursor: epoch and frame of the next minibatch
    frame: int = 0
    obj: float = 0.0           # current period's sums: log-prob, correct frames, seconds
    correct: float = 0.0
    t_wait: float = 0.0
    t_compute: float = 0.0
    elapsed: float = 0.0       # wall time of previous runs of this training
    lr_factor: float = 1.0     # < 1 while redoing a diverged period
    retries: int = 0           # consecutive divergences

    def start_period(self) -> None:
        """Clear the current period's counters (a new period, or a diverged one redone)."""
        self.batch, self.obj, self.correct, self.t_wait, self.t_compute = 0, 0.0, 0.0, 0.0, 0.0

    def advance(self, batch, wait: float, compute: float) -> None:
        """After a minibatch: the data cursor and the period's time sums."""
        self.epoch, self.frame = batch.epoch, batch.frame_in_epoch
        self.t_wait, self.t_compute = self.t_wait + wait, self.t_compute + compute

    def end_period(self, samples: int) -> None:
        self.period, self.samples = self.period + 1, self.samples + samples
        self.start_period()
        self.lr_factor, self.retries = 1.0, 0


# ----------------------------------------------------------------------------- the driver

def train(cfg, dist, stop: StopRequest | None = None) -> int:
    """Train; returns the exit code.  ``stop`` is the signal flag (installed by the CLI
    before MPI starts, so a signal during setup is not lost)."""
    stop = stop or StopRequest()
    log = MetricsLog(cfg.out_dir, speak=dist.rank == 0)
    dist.start_watchdog(cfg.collective_timeout, cfg.stop_timeout, stop)    # every collective from here on
    batches = stream = None
    try:
        # inputs, model, optimizer, schedule (bad input on any rank: all stop, nothing written)
        threads, infos, valid = check_inputs(cfg, dist, log)
        model, corpus_frames = dist.agree(lambda: initial_model(cfg, dist, infos))
        plan = Plan.make(cfg, dist.size, corpus_frames)
        dist.agree(lambda: dist.rank or checkpoint.claim_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite,
                                                                 log.info), "the claim of out_dir")
        prog, model, network, updater = (resume(cfg, dist, model, log) if cfg.resume
                                         else (Progress(), model, *learner(cfg, model)))
        num_periods = plan.num_periods(prog.period, prog.samples)
        announce(cfg, dist, log, threads, model, corpus_frames, plan, num_periods)
        stream = data.MinibatchStream(infos, cfg.minibatch_size, cfg.context, cfg.context, cfg.seed,
                                      dist.rank, cfg.window_frames, start=(prog.epoch, prog.frame))
        batches = data.Prefetcher(iter(stream), depth=cfg.prefetch_batches)
        start_time = time.perf_counter() - prog.elapsed
        while prog.period < num_periods:
            period = plan.period(prog.period, prog.samples)
            if network.config.num_hidden_layers < period.hidden_layers:       # layer-wise growth
                model, network, updater = grow(cfg, model, network, period.index, log)
            active = dist.rank in period.active
            snapshot = (backend.to_host(network.params).copy(), updater.state_dict())
            lr, lr_per_rank = period.lr * prog.lr_factor, period.lr_per_rank * prog.lr_factor
            t_period, first_batch, flags = time.perf_counter(), prog.batch, 0
            agreement = f"the stop/divergence agreement in period {prog.period + 1}"     # the watchdog's name
            while prog.batch < plan.batches_per_period:
                if active:   # forward backward update (half-size steps in pick-best periods)
                    t0, batch = time.perf_counter(), next(batches)
                    t1 = time.perf_counter()
                    for step in split(batch, plan.minibatch_for(period)):
                        flags |= flags & DIVERGED or train_step(network, updater, step, lr_per_rank, prog)
                    prog.advance(batch, t1 - t0, time.perf_counter() - t1)
                prog.batch += 1
                # stop / divergence agreement (idle ranks just wait here)
                last = prog.batch == plan.batches_per_period
                if last or prog.batch % cfg.signal_check_every == 0:
                    if last and active and not params_finite(network):
                        flags |= DIVERGED
                    flags = dist.any_flags(flags | (STOP if stop.requested else 0), agreement)
                    if flags:
                        break
            if flags & DIVERGED:
                roll_back(cfg, network, updater, snapshot, prog, log, "non-finite objective or parameters")
                continue
            if flags & STOP and prog.batch < plan.batches_per_period:
                save(cfg, dist, model, network, updater, prog, start_time, scheduled=False)
                return stopped(log, f"in period {prog.period + 1} after minibatch {prog.batch}")

            # average or pick the best active rank (or redo a period that ended far worse than
            # chance: divergence_action)
            rec, diverged = finish_period(cfg, dist, model, network, updater, prog, valid, plan, period, log)
            if diverged:
                roll_back(cfg, network, updater, snapshot, prog, log, diverged)
                continue
            prog.end_period(len(period.active) * plan.frames_per_period)

            # timing and logging
            log.record(period_record(rec, prog, plan, period, lr, lr_per_rank, num_periods, start_time,
                                     t_period, first_batch))

            # checkpoint and termination
            scheduled = prog.period % cfg.checkpoint_every == 0 or prog.period == num_periods
            if scheduled or flags & STOP:
                save(cfg, dist, model, network, updater, prog, start_time, scheduled)
            if flags & STOP and prog.period < num_periods:
                return stopped(log, f"after period {prog.period}")
    except DivergedError as exc:
        if dist.rank == 0:
            sys.stderr.write(f"ngsgd-train: error: {exc}\n")
        return EXIT_DIVERGED
    finally:
        shut_down(cfg, dist, stop, batches, stream)

    if dist.rank == 0:
        finish_training(cfg, model, network, valid, log, prog.period)
    return EXIT_OK


def period_record(rec, prog, plan, period, lr, lr_per_rank, num_periods, start_time, t_period,
                  first_batch) -> dict:
    """The period's metrics record; frames/s counts only the minibatches the active ranks of
    this process ran (a period resumed mid-way is not credited with those of the run before)."""
    now = time.perf_counter()
    return {**rec, "period": prog.period, "num_periods": num_periods, "samples": prog.samples,
            "lr": lr, "lr_per_rank": lr_per_rank, "elapsed": now - start_time,
            "eta": (now - start_time) / prog.period * (num_periods - prog.period),
            "frames_per_sec": (plan.batches_per_period - first_batch) * plan.minibatch_size
            * len(period.active) / (now - t_period)}


def shut_down(cfg, dist, stop, *closables) -> None:
    """Whatever way train() ends: signal handlers back, watchdog off, out_dir unlocked, files closed."""
    stop.restore()
    dist.stop_watchdog()
    checkpoint.release_out_dir(cfg.out_dir)
    for closable in closables:
        if closable is not None:
            closable.close()


def train_step(network, updater, batch, lr, prog) -> int:
    """One minibatch; returns DIVERGED if it produced non-finite numbers."""
    try:
        lp, nc = network.train_gradients(backend.to_device(batch.feats), backend.to_device(batch.labels))
        if not math.isfinite(lp):
            return DIVERGED
        updater.step(lr)
    except (FloatingPointError, np.linalg.LinAlgError):
        return DIVERGED
    prog.obj += lp
    prog.correct += nc
    return 0


def split(batch, size: int) -> list:
    """The minibatch as steps of ``size`` frames (pick-best periods: halves)."""
    if size >= len(batch.labels):
        return [batch]
    return [data.Batch(batch.feats[lo:lo + size], batch.labels[lo:lo + size], batch.epoch,
                       batch.frame_in_epoch) for lo in range(0, len(batch.labels), size)]


def grow(cfg, model, network, period: int, log):
    """Insert a hidden layer before ``period`` (Kaldi nnet-insert): a new network, hence a new
    buffer layout and a new updater with fresh state (Kaldi's jobs always start fresh)."""
    network = insert_hidden_layer(network, seed=[cfg.seed, period])
    log.info(f"period {period + 1}: inserted hidden layer {network.config.num_hidden_layers} "
             f"({network.params.size:,} parameters)")
    return (model.replace(network_config=network.config),
            network, make_updater(network, subset(cfg, OptimizerConfig)))


def learner(cfg, model, optimizer_state=None):
    """(network, updater) for ``model``; the updater's state from a checkpoint if given."""
    network = model.network()
    updater = make_updater(network, subset(cfg, OptimizerConfig))
    if optimizer_state is not None:
        updater.load_state_dict(optimizer_state)
    return network, updater


def stopped(log, where: str) -> int:
    log.info(f"stopped on signal {where}; checkpoint written, exit {EXIT_STOPPED}")
    return EXIT_STOPPED


def main_guarded(cfg, dist, stop: StopRequest | None = None) -> int:
    """train() with bad input turned into one message (rank 0) and exit code 2.  Bad input
    that one rank found alone (mid-run) propagates: ``abort_on_exception`` ends the job."""
    try:
        return train(cfg, dist, stop)
    except InputError as exc:
        if dist.size > 1 and not isinstance(exc, AgreedInputError):
            raise
        return report_bad_input("ngsgd-train", exc, speak=dist.rank == 0)


# ----------------------------------------------------------------------------- setup

def set_threads(cfg, dist) -> int:
    """Share the node's cores between the ranks on it (BLAS/OpenMP threads)."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    if cfg.threads_per_rank:
        threads = cfg.threads_per_rank
    else:
        usable = len(os.sched_getaffinity(0))
        # bound to a subset of the node's CPUs (srun --cpu-bind, taskset): that subset is ours;
        # otherwise the node's CPUs are shared by the ranks on it
        threads = usable if usable < (os.cpu_count() or usable) else usable // dist.local_size()
        threads = max(1, threads)
    threadpool_limits(threads)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    return threads


def check_inputs(cfg, dist, log):
    """Everything given, checked on every rank before anything is written (all ranks fail
    together): the device, out_dir, this rank's partitions and (rank 0) the validation file,
    then all ranks' partitions as one set.  Returns (BLAS threads per rank, infos, valid)."""
    threads = set_threads(cfg, dist)
    dist.agree(lambda: use_device(cfg.device))
    dist.agree(lambda: dist.rank or checkpoint.check_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite))
    infos, valid = dist.agree(lambda: open_data(cfg, dist))
    dist.agree(lambda: check_same_sizes(dist, infos))
    note = dist.agree(lambda: check_partition_set(dist, infos, valid))
    if note:
        log.info(note)
    return threads, infos, valid


def use_device(device: str) -> None:
    """``backend.use_device``, with a missing or unusable GPU stack reported as bad input."""
    try:
        backend.use_device(device)
    except Exception as exc:  # noqa: BLE001 - CuPy's own error types (driver, runtime, libraries)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"option device: {device} is not usable on this machine ({first})") from None


def open_data(cfg, dist):
    """This rank's partitions and (rank 0) the validation file, opened and checked."""
    mine = data.partitions_for_rank(data.find_partitions(cfg.train_data), dist.rank, dist.size)
    infos = [data.open_partition(p) for p in mine]
    first = infos[0]
    for info in infos[1:]:
        if (info.feat_dim, info.num_classes) != (first.feat_dim, first.num_classes):
            raise data.DataError(f"{info.path}: feat_dim/num_classes {info.feat_dim}/{info.num_classes} "
                                 f"differ from {first.path} ({first.feat_dim}/{first.num_classes})")
    frames = sum(i.num_frames for i in infos)
    if cfg.minibatch_size > frames:
        raise ConfigError(f"option minibatch_size: {cfg.minibatch_size} is more than the {frames} frames of "
                          f"rank {dist.rank}'s partitions")
    valid = (data.open_partition(cfg.valid_data, first.feat_dim, first.num_classes)
             if cfg.valid_data and dist.rank == 0 else None)
    return infos, valid


def check_same_sizes(dist, infos) -> None:
    """Every rank's training files agree on feat_dim and num_classes."""
    dims = dist.gather([infos[0].feat_dim, infos[0].num_classes])
    if np.any(dims != dims[0]):
        raise data.DataError("partitions disagree between ranks on feat_dim/num_classes: "
                             + ", ".join(f"rank {r}: {int(d[0])}/{int(d[1])}" for r, d in enumerate(dims)))


def check_partition_set(dist, infos, valid) -> str | None:
    """All ranks' training partitions are one preparation's, each once, and the validation
    file is not one of them; returns a note when only some of the partitions are used."""
    labels = [data.PartitionLabel(*label) for mine in dist.gather_objects(
        [tuple(data.PartitionLabel.of(i)) for i in infos], "the exchange of partition ids") for label in mine]
    note = data.check_partition_set(labels)
    if valid is not None and data.PartitionLabel.of(valid)[1:] in {label[1:] for label in labels}:
        raise data.DataError(f"option valid_data: {valid.path} is training partition {valid.partition_index} "
                             f"itself; validation needs held-out data (the prepared valid.h5)")
    return note


def initial_model(cfg, dist, infos) -> tuple[Model, int]:
    """(the untrained Model every rank starts from, frames of the whole corpus).  The input
    normalisation and class counts come from the partitions' stored sums, summed over ranks;
    the LDA-like transform from statistics of every k-th utterance, summed over ranks."""
    feat_dim, num_classes = infos[0].feat_dim, infos[0].num_classes
    totals = dist.sum_named({"frames": sum(i.num_frames for i in infos),
                             "feat_sum": sum(i.feat_sum for i in infos),
                             "feat_sumsq": sum(i.feat_sumsq for i in infos),
                             "class_counts": sum(i.class_counts for i in infos)})
    frames = int(totals["frames"])
    width = 2 * cfg.context + 1
    net_cfg = subset(cfg, NetworkConfig, input_dim=feat_dim * width, num_classes=num_classes)
    # parameters, gradients, the period snapshot and the updater's copies: refuse rather than swap
    need, have = 16 * net_cfg.num_params(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ConfigError(f"the network ({net_cfg.num_params():,} parameters for context {cfg.context}, "
                          f"feat_dim {feat_dim}, {num_classes} classes) needs about {need / 2**30:.0f} GiB, "
                          f"more than this machine's {have / 2**30:.0f} GiB")
    net_cfg = net_cfg.replace(num_hidden_layers=initial_depth(cfg))
    params = backend.to_host(Network(net_cfg, seed=cfg.seed).params)   # same seed: same start everywhere
    mean = std = transform = scale = None
    if cfg.lda_transform:
        stats = lda.LdaStats(**dist.sum_named(lda_statistics(cfg, infos, frames).as_dict()))
        transform = lda.estimate(stats)
    elif cfg.input_normalization:
        m, s = data.mean_and_std(totals["feat_sum"], totals["feat_sumsq"], frames)
        mean, std = np.tile(m, width), np.tile(s, width)
    if cfg.prior_scale_power:
        scale = presoftmax_prior_scale(totals["class_counts"], cfg.prior_scale_power)
    pipeline = read_pipeline(os.path.dirname(infos[0].path))    # what ngsgd-prepare did to the features
    return Model(net_cfg, params, cfg.context, mean, std, totals["class_counts"], config.to_dict(cfg),
                 input_pipeline=pipeline, input_transform=transform, output_scale=scale), frames


def initial_depth(cfg) -> int:
    """Hidden layers to start with: one with layer-wise growth, else all."""
    return 1 if cfg.add_layers_period and cfg.num_hidden_layers > 1 else cfg.num_hidden_layers


def lda_statistics(cfg, infos, corpus_frames: int, utterances_per_read: int = 64) -> lda.LdaStats:
    """This rank's LDA statistics: every k-th utterance of each of its partitions, k chosen
    so that about ``lda_max_frames`` frames of the corpus are used (the same utterances for
    any number of ranks)."""
    every = max(1, math.ceil(corpus_frames / cfg.lda_max_frames)) if cfg.lda_max_frames else 1
    width = 2 * cfg.context + 1
    stats = lda.LdaStats.zeros(infos[0].feat_dim * width, infos[0].num_classes)
    for info in infos:
        chosen = np.arange(0, len(info.utt_offsets) - 1, every)
        for lo in range(0, len(chosen), utterances_per_read):
            stats.accumulate(*data.read_spliced(info, chosen[lo:lo + utterances_per_read],
                                                cfg.context, cfg.context))
    return stats


def announce(cfg, dist, log, threads, model, frames, plan, num_periods) -> None:
    if dist.rank != 0:
        return
    log.info(f"ngsgd-train: {dist.size} rank(s), {threads} thread(s)/rank, device {cfg.device}, "
             f"MPI CUDA-aware: {dist.cuda_aware}\nresolved config:\n{config.format_resolved(cfg)}")
    majority = model.class_counts.max() / frames
    ramp = (f" (ramp: {plan.ranks_initial} -> {dist.size} active)" if plan.ranks_initial < dist.size else "")
    log.info(f"data: {frames:,} frames, feat_dim {model.feat_dim}, {model.network_config.num_classes} "
             f"classes (most frequent: {100 * majority:.1f}% of frames); network: "
             f"{model.network_config.num_hidden_layers} hidden layer(s), {model.params.size:,} parameters; "
             f"{num_periods} periods x {plan.batches_per_period} minibatches x {dist.size} rank(s){ramp}")


# ----------------------------------------------------------------------------- per period

def params_finite(network) -> bool:
    xp = backend.array_module(network.params)
    return bool(backend.to_host(xp.isfinite(network.params).all()))     # once per period


def roll_back(cfg, network, updater, snapshot, prog, log,
              reason: str = "non-finite objective or parameters") -> None:
    """Every rank restores the period's start and redoes it at half the learning rate."""
    prog.retries += 1
    if prog.retries > cfg.max_divergence_retries:
        raise DivergedError(f"training diverged {prog.retries} times in a row in period "
                            f"{prog.period + 1}; giving up (lower lr_initial?)")
    network.params[...] = backend.to_device(snapshot[0])
    updater.load_state_dict(snapshot[1])
    prog.lr_factor *= 0.5
    prog.start_period()
    log.event(prog.period + 1, "divergence", f"{reason}; restored the period's start, redoing it with "
              f"learning rate x{prog.lr_factor:g}", lr_factor=prog.lr_factor, retries=prog.retries,
              action="rollback")


def finite_divergence(cfg, period: int, train_obj: float, num_classes: int) -> str | None:
    """Why period ``period + 1`` diverged without a NaN: after the first period, a training
    objective worse than a uniform guess (-ln C) by more than ``divergence_margin``."""
    chance = -math.log(num_classes)
    if period >= 1 and train_obj < chance - cfg.divergence_margin:
        return (f"training objective {train_obj:.4f} nats/frame is worse than a uniform guess "
                f"(-ln {num_classes} = {chance:.4f}) by more than divergence_margin {cfg.divergence_margin:g}")
    return None


def finish_period(cfg, dist, model, network, updater, prog, valid, plan, period, log):
    """Combine the models of the period's active ranks (average, or keep the best one), then
    the period's metrics: (record, None), or (None, why) when the period diverged finitely and
    ``divergence_action`` is rollback."""
    frames = plan.frames_per_period
    table = dist.gather([prog.obj / frames, prog.correct / frames, prog.t_wait, prog.t_compute],
                        f"the gather of the training objectives of period {prog.period + 1}")
    trained = table[list(period.active)]
    train_obj = float(trained[:, 0].mean())
    diverged = finite_divergence(cfg, prog.period, train_obj, model.network_config.num_classes)
    if diverged and cfg.divergence_action == "rollback":
        return None, diverged
    if diverged:
        log.event(prog.period + 1, "divergence", f"{diverged} (divergence_action: {cfg.divergence_action})",
                  action=cfg.divergence_action)
        if cfg.divergence_action == "abort":
            raise DivergedError(f"period {prog.period + 1}: {diverged}; divergence_action is abort "
                                f"(lower lr_initial?)")
    t0 = time.perf_counter()
    outcome = averaging.combine_ranks(dist, network.params, table[:, 0], pick_best=period.pick_best,
                                      outlier_threshold=cfg.outlier_threshold, active=period.active)
    t_allreduce = time.perf_counter() - t0
    if cfg.ng_reset_on_average:
        updater.reset()
    rec = {"train_obj": train_obj, "train_acc": float(trained[:, 1].mean()),
           "valid_obj": None, "valid_acc": None, "time_data_wait": float(trained[:, 2].mean()),
           "time_compute": float(trained[:, 3].mean()), "time_allreduce": t_allreduce,
           "rank_train_obj": [float(o) if r in period.active else None for r, o in enumerate(table[:, 0])],
           "active_ranks": len(period.active), "num_hidden_layers": network.config.num_hidden_layers}
    if outcome.note:
        rec["note"] = outcome.note
    if diverged:
        rec["diverged"] = True
    if outcome.picked is not None:
        why = "a layer was added" if period.grows else "first period"
        log.event(prog.period + 1, "pick_best", f"kept rank {outcome.picked}'s model (best training "
                  f"objective) instead of averaging: {why}", rank=outcome.picked, reason=why)
    if valid is not None:
        result = evaluation.evaluate_partition(network, valid, cfg.context)
        rec["valid_obj"], rec["valid_acc"] = result.objective, result.accuracy
    return rec, None


def finish_training(cfg, model, network, valid, log, period) -> None:
    """final.h5: the combination of the last checkpoints (combine_method), or the last model,
    with priors and input pipeline (priors.finalize); its validation objective and accuracy
    are logged and kept in its info."""
    final = os.path.join(cfg.out_dir, "final.h5")
    result = None
    if cfg.combine_last_k > 1:
        result = combine.final_combination(
            cfg.out_dir, cfg.combine_method, cfg.combine_last_k, valid=valid,
            train_partition=data.find_partitions(cfg.train_data)[0], context=cfg.context,
            frames=cfg.combine_frames, num_evals=cfg.combine_lbfgs_evals, seed=cfg.seed,
            normalize=cfg.normalize_stddev, log=log.info)
    if result is None:
        params, what = backend.to_host(network.params), {"combined_models": 1}
        if cfg.normalize_stddev:
            params, what["normalized_stddev"] = combine.normalize_stddev(network.config, params), True
    else:
        params, what = result
    final_model = priors.finalize(model.replace(params=params, info={"period": period, **what}),
                                  cfg.train_data, log.info)
    note = f"{what['combined_models']} model(s)"
    if valid is not None:
        result = evaluation.evaluate_partition(final_model.network(), valid, cfg.context)
        final_model.info.update(valid_obj=result.objective, valid_acc=result.accuracy)
        note += f", valid {result.objective:.4f} ({100 * result.accuracy:.2f}%)"
    final_model.save(final)
    log.info(f"done: {period} periods; final model {final} ({note})")


# ----------------------------------------------------------------------------- checkpoints

def save(cfg, dist, model, network, updater, prog, start_time, scheduled: bool) -> None:
    """A checkpoint of exactly where every rank is.  Mid-period (a stop on signal) the ranks'
    parameters differ, so each state file then also holds its rank's parameters.  Checkpoints
    written only because of a stop are not ``scheduled``: combination and pruning ignore
    them, so a stopped-and-resumed run ends exactly like an uninterrupted one."""
    prog.elapsed = time.perf_counter() - start_time
    params = backend.to_host(network.params)
    state = {"optimizer": updater.state_dict(), "progress": asdict(prog)}
    if prog.batch:
        state["params"] = params
    averaged = model.replace(params=params, info={"period": prog.period, "batch": prog.batch,
                                                  "samples": prog.samples}) if dist.rank == 0 else None
    checkpoint.write(cfg.out_dir, dist, prog.period, prog.batch, scheduled, state, averaged, cfg.keep_last_k)


def resume(cfg, dist, model, log):
    """(progress, model, network, updater) from the newest usable checkpoint (a fresh start
    when there is none: then metrics.jsonl is emptied too, so the new run's records do not
    follow the old ones).  The network is built for the checkpoint's architecture (it may be
    an earlier stage of layer-wise growth) with the checkpoint's fixed input transform and
    output scale.

    Same number of ranks: everything is restored (bit-identical continuation).  Different
    number: only averaged checkpoints qualify; the averaged parameters and the samples done
    are kept, per-rank optimizer state and data order start fresh, and the schedule plans the
    remaining samples with the new number of ranks (docs/reliability.md)."""

    def restore(ckpt: checkpoint.Checkpoint):
        saved = Model.load(ckpt.model_path)
        check_architecture(cfg, saved.network_config, model.network_config, ckpt.model_path)
        differences = fixed_differences(saved.train_config, cfg)
        if differences:
            raise checkpoint.MismatchError(
                f"{ckpt.path} was written with other options ({'; '.join(differences)}): resume with "
                f"the checkpoint's options, or start a new run in another out_dir")
        samples = saved.info.get("samples")
        if type(samples) is not int or samples < 0:
            raise checkpoint.CheckpointError(f"{ckpt.model_path}: 'samples' must be a count, got {samples!r}")
        saved = saved.replace(train_config=model.train_config, info={})
        if ckpt.num_ranks != dist.size:
            if ckpt.batch:
                raise checkpoint.RankCountError(f"{ckpt.path}: a mid-period checkpoint of "
                                                f"{ckpt.num_ranks} ranks cannot seed {dist.size}")
            return (Progress(period=ckpt.period, samples=samples, epoch=ckpt.period), saved,
                    *learner(cfg, saved),
                    f"resumed from {ckpt.path} written by {ckpt.num_ranks} ranks with {dist.size} ranks: "
                    f"averaged parameters and {samples:,} samples done kept, per-rank optimizer state "
                    f"and data order re-initialised")
        state = checkpoint.load_state(checkpoint.state_path(ckpt.path, dist.rank))
        try:
            prog = progress_from(state["progress"])
            params = state["params"] if ckpt.batch else saved.params
            if not isinstance(params, np.ndarray) or params.shape != saved.params.shape:
                raise ValueError(f"params of shape {getattr(params, 'shape', None)}")
            saved = saved.replace(params=params)
            network, updater = learner(cfg, saved, state["optimizer"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise checkpoint.CheckpointError(f"{ckpt.path}: state of rank {dist.rank} does not fit "
                                             f"this run ({exc})") from None
        return prog, saved, network, updater, (
            f"resumed from checkpoint after period {ckpt.period}"
            + (f", minibatch {ckpt.batch}" if ckpt.batch else "")
            + f" (data cursor epoch {prog.epoch}, frame {prog.frame})")

    found = checkpoint.resume(cfg.out_dir, dist, restore, log.info)
    if found is None:
        log.keep_periods_up_to(0)
        log.info(f"--resume: no usable checkpoint in {cfg.out_dir}; starting from the beginning")
        return (Progress(), model, *learner(cfg, model))
    *restored, note = found
    log.keep_periods_up_to(restored[0].period)
    log.info(note)
    return tuple(restored)


def check_architecture(cfg, saved: NetworkConfig, configured: NetworkConfig, path: str) -> None:
    """The checkpoint's network is the configured one, or (layer-wise growth) an earlier
    stage of it: the same but for fewer hidden layers."""
    growing = cfg.add_layers_period and saved.replace(num_hidden_layers=configured.num_hidden_layers) \
        == configured and 1 <= saved.num_hidden_layers <= cfg.num_hidden_layers
    if saved != configured and not growing:
        raise checkpoint.MismatchError(
            f"{path}: architecture {saved.to_dict()} differs from the configured one {configured.to_dict()}")


def progress_from(record: dict) -> Progress:
    """Progress from a state file's record, every field present and of its type."""
    fields = Progress.__dataclass_fields__
    if set(record) != set(fields):
        raise ValueError(f"progress fields {sorted(record)}, expected {sorted(fields)}")
    for name, value in record.items():
        kind = type(getattr(Progress(), name))
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise ValueError(f"progress field {name!r} must be {kind.__name__}, got {value!r}")
    return Progress(**record)
