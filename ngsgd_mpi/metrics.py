"""``out_dir/metrics.jsonl``: one JSON record per averaging period, plus event records.

A *period record* (written once per average, by rank 0) has::

    period, num_periods            averages done / planned
    samples                        samples processed by all ranks so far
    lr, lr_per_rank                effective learning rate and the one each rank stepped with
    train_obj, train_acc           mean over the active ranks of the period's log-prob/frame and accuracy
    rank_train_obj                 the same objective per rank (None: the rank was idle)
    active_ranks                   ranks that trained in the period (the job ramp; else all)
    num_hidden_layers              depth of the network it trained (layer-wise growth)
    valid_obj, valid_acc           on the validation file (None without one)
    frames_per_sec, elapsed, eta   speed (all ranks), seconds since the start, estimate to the end
    time_compute, time_data_wait   seconds per rank in the step / waiting for data (mean over ranks)
    time_allreduce                 seconds in the average
    note                           optional: what the average did differently (pick best, outliers)

An *event record* has ``period`` (the period it happened in), ``event`` and ``message``,
plus fields of its own: "divergence" (``lr_factor``, ``retries``) and "pick_best" (the period
ended by keeping the best active rank's model instead of averaging: ``rank``, ``reason``
"first period" or "a layer was added"; written just before that period's record).  :func:`read_metrics` is the one reader
(``ngsgd-plot``, the experiment scripts and the tests use it).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

METRICS_FILE = "metrics.jsonl"
REQUIRED_FIELDS = ("period", "samples", "elapsed", "train_obj", "train_acc")


@dataclass
class Metrics:
    """One run's records: ``periods`` in order (a redone period replaces the earlier one) and
    ``events``, each with the samples and elapsed seconds of the period record before it."""
    path: str
    periods: list[dict]
    events: list[dict] = field(default_factory=list)


def metrics_path(path: str) -> str:
    """The metrics file of a run directory (or the file itself)."""
    return os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path


def read_metrics(path: str, allow_empty: bool = False) -> Metrics:
    """Read a run directory's metrics.jsonl (or that file); ValueError naming file and line
    for anything malformed."""
    file = metrics_path(path)
    if not os.path.isfile(file):
        raise ValueError(f"{file}: no such metrics file")
    periods, events = [], []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file}:{number}: not a JSON record ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{file}:{number}: expected a JSON object, got {type(rec).__name__}")
            if rec.get("event"):
                last = periods[-1] if periods else {"samples": 0, "elapsed": 0.0}
                events.append({**rec, "samples": last["samples"], "elapsed": last["elapsed"]})
                continue
            for name in REQUIRED_FIELDS:
                if not isinstance(rec.get(name), (int, float)):
                    raise ValueError(f"{file}:{number}: field {name!r} missing or not a number")
            if periods and rec["period"] <= periods[-1]["period"]:
                periods = [r for r in periods if r["period"] < rec["period"]]
            periods.append(rec)
    if not periods and not allow_empty:
        raise ValueError(f"{file}: no period records")
    return Metrics(file, periods, events)


class MetricsLog:
    """Rank 0 appends records to metrics.jsonl and prints progress lines; other ranks are quiet."""

    def __init__(self, out_dir: str, speak: bool):
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.speak = speak

    def info(self, text: str) -> None:
        if self.speak:
            print(text, flush=True)

    def keep_periods_up_to(self, period: int) -> None:
        """On resume: drop the records of periods that will be redone (all of them for 0)."""
        if not self.speak or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if _period_of(line) <= period]
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def record(self, rec: dict) -> None:
        if not self.speak:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        self.info(progress_line(rec))

    def event(self, period: int, event: str, message: str, **fields) -> None:
        self.record({"period": period, "event": event, "message": message, **fields})


def _period_of(line: str) -> float:
    """The period of a record line; infinity for a line that is not a record (a blank line, or
    the torn last line of a run killed while appending), so that it is dropped."""
    try:
        period = json.loads(line).get("period")
    except (ValueError, AttributeError):
        return math.inf
    return period if isinstance(period, (int, float)) and not isinstance(period, bool) else math.inf


def progress_line(rec: dict) -> str:
    if rec.get("event"):
        return f"period {rec['period']}: {rec['event']}: {rec['message']}"
    valid = (f" | valid {rec['valid_obj']:.4f} ({100 * rec['valid_acc']:.1f}%)"
             if rec.get("valid_obj") is not None else "")
    return (f"period {rec['period']}/{rec['num_periods']} | samples {rec['samples']:,} | "
            f"{rec['frames_per_sec']:,.0f} fr/s | train {rec['train_obj']:.4f} "
            f"({100 * rec['train_acc']:.1f}%){valid} | lr {rec['lr']:.3g} | "
            f"{hms(rec['elapsed'])} elapsed | ETA {hms(rec['eta'])}")


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
