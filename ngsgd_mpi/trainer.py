"""The SPMD training driver: every rank runs :func:`train`; read it top to bottom.

Each rank trains its own copy of the network on its own partitions for a
*period* of ``samples_per_average`` samples, then all ranks average their
flat parameter buffers with one Allreduce and continue from the average.
Every rank does the same number of minibatches per period (each wraps
around its own data), so the collectives line up without coordination.

Learning rate: the *effective* rate decays geometrically with the fraction
of the planned samples already processed, from ``lr_initial`` (first
period) to ``lr_final`` (last period), as Kaldi's accel2 recipes do; each
rank steps with N times it (``lr_scale_by_ranks``), because averaging N
models divides each rank's contribution by N (the paper's "n times" rule).

Fault handling (docs/reliability.md):
* SIGUSR1/SIGTERM on any rank -> at the next check (every
  ``signal_check_every`` minibatches; one tiny Allreduce) all ranks write a
  checkpoint of exactly where they are and exit with EXIT_STOPPED (75); the
  same command with ``--resume`` continues bit-identically.
* A non-finite objective or parameters on any rank -> every rank restores the
  period's starting parameters and optimiser state and redoes the period at
  half the learning rate; ``max_divergence_retries`` in a row -> abort.
* Before each average, every rank checks in with rank 0 within
  ``collective_timeout`` seconds, or the job is aborted naming the missing ranks.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import backend, checkpoint, combine, config, data
from .network import Network, NetworkConfig
from .optim import OptimizerConfig, make_updater

EXIT_OK, EXIT_CRASH, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STOPPED = 0, 1, 2, 4, 75
STOP, DIVERGED = 1, 2          # bits of the flag word the ranks agree on


class SetupError(RuntimeError):
    """Bad input found by one or more ranks before training started."""


class DivergedError(RuntimeError):
    """Training kept diverging after the allowed number of retries."""


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


def agree(dist, step):
    """Run ``step()`` on every rank; if it fails on any rank with a user-input
    error, raise SetupError with every rank's message on all ranks (nothing
    has been written yet, and no rank is left waiting in a collective)."""
    try:
        result, message = step(), None
    except (data.DataError, config.ConfigError, checkpoint.CheckpointError) as exc:
        result, message = None, str(exc)
    messages = dist.comm.allgather(message) if dist.size > 1 else [message]
    failed = list(dict.fromkeys(m for m in messages if m))
    if failed:
        raise SetupError("\n".join(failed))
    return result


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


def learning_rate(cfg, samples_done: int, total: int, samples_per_period: int) -> float:
    """Effective rate: geometric in the fraction of data processed, lr_final on the last period."""
    frac = min(1.0, samples_done / max(total - samples_per_period, 1))
    return cfg.lr_initial * math.exp(frac * math.log(cfg.lr_final / cfg.lr_initial))


def evaluate_file(network, info, context: int, block_frames: int = 8192):
    """(log-prob per frame, frame accuracy) of ``network`` on a whole file."""
    logprob, correct = 0.0, 0
    for feats, labels in data.iterate_utterance_blocks(info, context, context, block_frames):
        lp, nc = network.evaluate(backend.to_device(feats), backend.to_device(labels))
        logprob += lp
        correct += nc
    return logprob / info.num_frames, correct / info.num_frames


class Log:
    """Progress lines on rank 0 and metrics.jsonl records; quiet elsewhere."""

    def __init__(self, dist, out_dir: str):
        self.on = dist.rank == 0
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")

    def info(self, text: str) -> None:
        if self.on:
            print(text, flush=True)

    def keep_metrics_before(self, period: int) -> None:
        """On resume, drop records of periods that will be redone."""
        if not self.on or not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["period"] <= period]
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.metrics_path)

    def record(self, rec: dict) -> None:
        if not self.on:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if rec.get("event"):
            self.info(f"period {rec['period']}: {rec['event']}: {rec['message']}")
            return
        valid = (f" | valid {rec['valid_obj']:.4f} ({100 * rec['valid_acc']:.1f}%)"
                 if rec.get("valid_obj") is not None else "")
        self.info(f"period {rec['period']}/{rec['num_periods']} | samples {rec['samples']:,} | "
                  f"{rec['frames_per_sec']:,.0f} fr/s | train {rec['train_obj']:.4f} "
                  f"({100 * rec['train_acc']:.1f}%){valid} | lr {rec['lr']:.3g} | "
                  f"{_hms(rec['elapsed'])} elapsed | ETA {_hms(rec['eta'])}")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class StopRequest:
    """Remembers that SIGUSR1/SIGTERM arrived; the loop acts on it at a check."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- setup

def load_data(cfg, dist):
    """Open and check this rank's partitions and (rank 0) the validation file."""
    mine = data.partitions_for_rank(config.train_paths(cfg.train_data), dist.rank, dist.size)
    infos = [data.open_partition(p) for p in mine]
    first = infos[0]
    for info in infos[1:]:
        if (info.feat_dim, info.num_classes) != (first.feat_dim, first.num_classes):
            raise data.DataError(f"{info.path}: feat_dim/num_classes {info.feat_dim}/{info.num_classes} "
                                 f"differ from {first.path} ({first.feat_dim}/{first.num_classes})")
    valid = (data.open_partition(cfg.valid_data, first.feat_dim, first.num_classes)
             if cfg.valid_data and dist.rank == 0 else None)
    return infos, valid


def check_same_dims(dist, infos) -> None:
    dims = dist.gather([infos[0].feat_dim, infos[0].num_classes])
    if np.any(dims != dims[0]):
        raise data.DataError("partitions disagree between ranks on feat_dim/num_classes: "
                             + ", ".join(f"rank {r}: {int(d[0])}/{int(d[1])}" for r, d in enumerate(dims)))


class Model:
    """The network plus what is saved with it (input normalisation, class counts)."""

    def __init__(self, cfg, feat_dim, num_classes, feat_mean, feat_std, class_counts):
        width = 2 * cfg.context + 1
        self.net_cfg = NetworkConfig(
            input_dim=feat_dim * width, num_classes=num_classes, num_hidden_layers=cfg.num_hidden_layers,
            nonlinearity=cfg.nonlinearity, pnorm_input_dim=cfg.pnorm_input_dim,
            pnorm_output_dim=cfg.pnorm_output_dim, pnorm_p=cfg.pnorm_p, relu_dim=cfg.relu_dim)
        self.network = Network(self.net_cfg, seed=cfg.seed)   # same seed: identical start everywhere
        self.input_mean = np.tile(feat_mean, width) if cfg.input_normalization else None
        self.input_std = np.tile(feat_std, width) if cfg.input_normalization else None
        if self.input_mean is not None:
            self.network.set_input_normalization(self.input_mean, self.input_std)
        self.class_counts = class_counts
        self.train_config = config.to_dict(cfg)

    def save(self, path: str, params=None, **attrs) -> None:
        params = backend.to_host(self.network.params) if params is None else params
        checkpoint.save_model(path, params, self.net_cfg.to_dict(), self.train_config,
                              input_mean=self.input_mean, input_std=self.input_std,
                              class_counts=self.class_counts, extra_attrs=attrs)


# ----------------------------------------------------------------------------- the driver

def train(cfg, dist, stop: StopRequest | None = None) -> int:
    """Train; ``stop`` is the signal flag (installed by the CLI before MPI starts,
    so a signal during setup is not lost)."""
    out_dir = cfg.out_dir
    log = Log(dist, out_dir)
    threads = set_threads(cfg, dist)
    backend.use_device(cfg.device)

    # ---- data: every rank checks its own files; errors are agreed before anything is written
    infos, valid = agree(dist, lambda: load_data(cfg, dist))
    agree(dist, lambda: check_same_dims(dist, infos))
    feat_dim, num_classes = infos[0].feat_dim, infos[0].num_classes
    stats = dist.sum(np.concatenate([[sum(i.num_frames for i in infos)],
                                     sum(i.feat_sum for i in infos), sum(i.feat_sumsq for i in infos),
                                     sum(i.class_counts for i in infos)]))
    global_frames = int(stats[0])
    feat_mean = stats[1:1 + feat_dim] / global_frames
    feat_var = stats[1 + feat_dim:1 + 2 * feat_dim] / global_frames - feat_mean ** 2
    feat_std = np.sqrt(np.maximum(feat_var, 1e-10))

    # ---- model, optimiser, schedule
    model = Model(cfg, feat_dim, num_classes, feat_mean, feat_std, stats[1 + 2 * feat_dim:])
    network = model.network
    updater = make_updater(network, OptimizerConfig(
        name=cfg.optimizer, rank_in=cfg.rank_in, rank_out=cfg.rank_out, update_period=cfg.update_period,
        num_samples_history=cfg.num_samples_history, alpha=cfg.alpha,
        max_change_per_sample=cfg.max_change_per_sample, schedule=cfg.ng_schedule,
        simple_alpha=cfg.simple_alpha, max_change=cfg.max_change, max_param_change=cfg.max_param_change))
    batches_per_period = math.ceil(cfg.samples_per_average / cfg.minibatch_size)
    frames_per_period = batches_per_period * cfg.minibatch_size           # per rank
    samples_per_period = frames_per_period * dist.size                     # all ranks
    total = cfg.total_samples or int(cfg.num_epochs * global_frames)
    lr_mult = dist.size if cfg.lr_scale_by_ranks else 1

    # ---- resume
    prog = Progress()
    if cfg.resume:
        resumed = agree(dist, lambda: resume_from(out_dir, dist, model, updater, log))
        if resumed is not None:
            prog, note = resumed
            log.keep_metrics_before(prog.period)
            log.info(note)
    num_periods = prog.period + max(0, math.ceil((total - prog.samples) / samples_per_period))
    if dist.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        log.info(f"ngsgd-train: {dist.size} rank(s), {threads} thread(s)/rank, device {cfg.device}, "
                 f"MPI CUDA-aware: {dist.cuda_aware}\nresolved config:\n{config.format_resolved(cfg)}")
        majority = model.class_counts.max() / global_frames
        log.info(f"data: {global_frames:,} frames, feat_dim {feat_dim}, {num_classes} classes "
                 f"(most frequent: {100 * majority:.1f}% of frames); "
                 f"network: {network.params.size:,} parameters; {num_periods} periods x "
                 f"{batches_per_period} minibatches x {dist.size} rank(s)")

    stream = data.MinibatchStream(infos, cfg.minibatch_size, cfg.context, cfg.context, cfg.seed,
                                  dist.rank, cfg.window_frames, start=(prog.epoch, prog.frame))
    batches = data.Prefetcher(iter(stream), depth=cfg.prefetch_batches)
    stop = stop or StopRequest()
    start_time = time.perf_counter() - prog.elapsed
    try:
        while prog.period < num_periods:
            # what a diverged period rolls back to
            snapshot = (backend.to_host(network.params).copy(), updater.state_dict())
            lr = learning_rate(cfg, prog.samples, total, samples_per_period) * prog.lr_factor
            t_period = time.perf_counter()
            flags = 0
            while prog.batch < batches_per_period:
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                if not flags & DIVERGED:
                    flags |= train_step(network, updater, batch, lr * lr_mult, prog)
                prog.epoch, prog.frame = batch.epoch, batch.frame_in_epoch
                prog.batch += 1
                prog.t_wait += t1 - t0
                prog.t_compute += time.perf_counter() - t1
                if prog.batch % cfg.signal_check_every == 0 or prog.batch == batches_per_period:
                    if prog.batch == batches_per_period and not params_finite(network):
                        flags |= DIVERGED
                    flags = dist.max_flag(flags | (STOP if stop.requested else 0))
                    if flags & DIVERGED:
                        break
                    if flags & STOP and prog.batch < batches_per_period:
                        write_checkpoint(cfg, dist, model, updater, prog, start_time, scheduled=False)
                        log.info(f"stopped on signal in period {prog.period + 1} after minibatch "
                                 f"{prog.batch}; checkpoint written, exit {EXIT_STOPPED}")
                        return EXIT_STOPPED
            if flags & DIVERGED:
                roll_back(cfg, dist, network, updater, snapshot, prog, log)
                continue

            rec = finish_period(cfg, dist, model, updater, prog, valid, frames_per_period)
            prog.period += 1
            prog.samples += samples_per_period
            prog.batch, prog.obj, prog.correct, prog.t_wait, prog.t_compute = 0, 0.0, 0.0, 0.0, 0.0
            prog.lr_factor, prog.retries = 1.0, 0
            now = time.perf_counter()
            rec.update(period=prog.period, num_periods=num_periods, samples=prog.samples, lr=lr,
                       lr_per_rank=lr * lr_mult, elapsed=now - start_time,
                       eta=(now - start_time) / prog.period * (num_periods - prog.period),
                       frames_per_sec=samples_per_period / (now - t_period))
            log.record(rec)
            scheduled = prog.period % cfg.checkpoint_every == 0 or prog.period == num_periods
            if scheduled or flags & STOP:
                write_checkpoint(cfg, dist, model, updater, prog, start_time, scheduled)
            if flags & STOP and prog.period < num_periods:
                log.info(f"stopped on signal after period {prog.period}; checkpoint written, "
                         f"exit {EXIT_STOPPED}")
                return EXIT_STOPPED
    except DivergedError as exc:
        log.info(f"ngsgd-train: error: {exc}")
        return EXIT_DIVERGED
    finally:
        stop.restore()
        batches.close()
        stream.close()

    if dist.rank == 0:
        finish_training(cfg, model, valid, log, prog.period)
    return EXIT_OK


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


def params_finite(network) -> bool:
    xp = backend.array_module(network.params)
    return bool(xp.isfinite(network.params).all())


def roll_back(cfg, dist, network, updater, snapshot, prog, log) -> None:
    """Every rank restores the period's start and redoes it at half the learning rate."""
    prog.retries += 1
    if prog.retries > cfg.max_divergence_retries:
        raise DivergedError(f"training diverged {prog.retries} times in a row in period "
                            f"{prog.period + 1}; giving up (lower lr_initial?)")
    network.params[...] = backend.to_device(snapshot[0])
    updater.load_state_dict(snapshot[1])
    prog.lr_factor *= 0.5
    prog.batch, prog.obj, prog.correct = 0, 0.0, 0.0
    log.record({"period": prog.period + 1, "event": "divergence",
                "message": f"non-finite objective or parameters; restored the period's start, "
                           f"redoing it with learning rate x{prog.lr_factor:g}",
                "lr_factor": prog.lr_factor, "retries": prog.retries})


def finish_period(cfg, dist, model, updater, prog, valid, frames) -> dict:
    """Average (with Kaldi's safeguards), then the period's metrics."""
    network = model.network
    dist.checkin(cfg.collective_timeout, f"the average after period {prog.period + 1}")
    table = dist.gather([prog.obj / frames, prog.correct / frames, prog.t_wait, prog.t_compute])
    objs = table[:, 0]
    t0 = time.perf_counter()
    excluded = []
    if prog.period == 0 and cfg.first_period_pick_best:
        best = int(np.argmax(objs))
        dist.broadcast_(network.params, root=best)
        note = f"picked rank {best} (best training objective) instead of averaging"
    else:
        keep = np.ones(dist.size, bool)
        if cfg.outlier_threshold > 0:
            keep = objs >= objs.max() - cfg.outlier_threshold
        excluded = [int(r) for r in np.flatnonzero(~keep)]
        dist.average_(network.params, weight=float(keep[dist.rank]), total_weight=float(keep.sum()))
        note = f"excluded rank(s) {excluded} (objective > {cfg.outlier_threshold} below best)" \
            if excluded else None
    t_allreduce = time.perf_counter() - t0
    if cfg.ng_reset_on_average:
        updater.reset()
    rec = {"train_obj": float(objs.mean()), "train_acc": float(table[:, 1].mean()),
           "valid_obj": None, "valid_acc": None, "time_data_wait": float(table[:, 2].mean()),
           "time_compute": float(table[:, 3].mean()), "time_allreduce": t_allreduce,
           "rank_train_obj": [float(o) for o in objs]}
    if note:
        rec["note"] = note
    if valid is not None:
        rec["valid_obj"], rec["valid_acc"] = evaluate_file(network, valid, cfg.context)
    return rec


def finish_training(cfg, model, valid, log, period) -> None:
    """final.h5: the best average of the last checkpoints (or the last model)."""
    final = os.path.join(cfg.out_dir, "final.h5")
    if cfg.combine_last_k > 1 and valid is not None:
        result = combine.combine_checkpoints(cfg.out_dir, valid, cfg.combine_last_k, log=log.info)
        if result is not None:
            params, n = result
            model.save(final, params=params, period=period, combined_models=n)
            log.info(f"done: {period} periods; final model {final} (average of the last {n})")
            return
    model.save(final, period=period, combined_models=1)
    log.info(f"done: {period} periods; final model {final}")


def write_checkpoint(cfg, dist, model, updater, prog, start_time, scheduled: bool) -> None:
    """Rank 0 writes the model, every rank its own state; COMPLETE last.

    Mid-period (a stop on signal) the ranks' parameters differ, so each state
    file then also holds its rank's parameters.  Checkpoints written only
    because of a stop are not ``scheduled``: combination and pruning ignore
    them, so a stopped-and-resumed run ends exactly like an uninterrupted one."""
    ckpt = checkpoint.checkpoint_dir(cfg.out_dir, prog.period, prog.batch)
    if dist.rank == 0:
        os.makedirs(ckpt, exist_ok=True)
    dist.barrier()
    prog.elapsed = time.perf_counter() - start_time
    state = {f"optimizer/{k}": v for k, v in updater.state_dict().items()}
    state.update({f"progress/{k}": v for k, v in asdict(prog).items()})
    if prog.batch:
        state["params"] = backend.to_host(model.network.params)
    checkpoint.save_state(checkpoint.state_path(ckpt, dist.rank), state)
    if dist.rank == 0:
        model.save(os.path.join(ckpt, "model.h5"), period=prog.period, batch=prog.batch,
                   samples=prog.samples)
    dist.barrier()
    if dist.rank == 0:
        checkpoint.mark_complete(ckpt, {"period": prog.period, "batch": prog.batch,
                                        "num_ranks": dist.size, "scheduled": scheduled})
        checkpoint.prune(cfg.out_dir, cfg.keep_last_k)
    dist.barrier()          # no rank exits (e.g. with 75) before the checkpoint is complete


def resume_from(out_dir, dist, model, updater, log):
    """(Progress, note) from the newest usable checkpoint; None when there is none.

    A checkpoint that fails to load on any rank (corrupt, truncated) is
    reported and the next older one is tried.  Same number of ranks:
    everything is restored (bit-identical continuation).  Different number:
    only *averaged* checkpoints qualify; the parameters are kept, per-rank
    state starts fresh and the schedule continues from the samples processed."""
    found = checkpoint.complete_checkpoints(out_dir)
    for ckpt in reversed(found):
        try:
            result, problem = load_checkpoint(ckpt, dist, model, updater), None
        except checkpoint.CheckpointError as exc:
            result, problem = None, str(exc)
        problems = [p for p in (dist.comm.allgather(problem) if dist.size > 1 else [problem]) if p]
        if not problems:
            return result
        if any("architecture" in p for p in problems):
            raise checkpoint.CheckpointError(problems[0])
        updater.reset()
        log.info(f"checkpoint {ckpt.path} is unusable ({'; '.join(problems)}); trying an older one")
    if found:
        raise checkpoint.CheckpointError(f"{out_dir}: no usable checkpoint (all {len(found)} failed to load)")
    return None


def load_checkpoint(ckpt, dist, model, updater):
    info = checkpoint.read_complete_info(ckpt.path)
    same_ranks = info["num_ranks"] == dist.size
    if not same_ranks and ckpt.batch:
        raise checkpoint.CheckpointError(
            f"{ckpt.path}: a mid-period checkpoint of {info['num_ranks']} ranks cannot seed {dist.size}")
    arrays, attrs = checkpoint.load_model_file(os.path.join(ckpt.path, "model.h5"))
    if attrs["network_config"] != model.net_cfg.to_dict():
        raise checkpoint.CheckpointError(
            f"{ckpt.path}/model.h5: architecture {attrs['network_config']} differs from the "
            f"configured one {model.net_cfg.to_dict()}")
    network = model.network
    if not same_ranks:
        network.params[...] = backend.to_device(arrays["params"])
        prog = Progress(period=ckpt.period, samples=int(attrs["samples"]), epoch=ckpt.period)
        return prog, (f"resumed from {ckpt.path} written by {info['num_ranks']} ranks with {dist.size} "
                      f"ranks: averaged parameters kept, per-rank optimizer state and data order "
                      f"re-initialised, learning rate x{dist.size}")
    record, _ = checkpoint.load_state(checkpoint.state_path(ckpt.path, dist.rank))
    network.params[...] = backend.to_device(record["params"] if ckpt.batch else arrays["params"])
    updater.load_state_dict({k[10:]: v for k, v in record.items() if k.startswith("optimizer/")})
    prog = Progress(**{k[9:]: v for k, v in record.items() if k.startswith("progress/")})
    return prog, (f"resumed from checkpoint after period {ckpt.period}"
                  + (f", minibatch {ckpt.batch}" if ckpt.batch else "")
                  + f" (data cursor epoch {prog.epoch}, frame {prog.frame})")


def main_guarded(cfg, dist, stop: StopRequest | None = None) -> int:
    """train() with bad input turned into one message and exit code 2."""
    try:
        return train(cfg, dist, stop)
    except SetupError as exc:
        if dist.rank == 0:
            sys.stderr.write(f"ngsgd-train: error: {exc}\n")
        return EXIT_BAD_INPUT
