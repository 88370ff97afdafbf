"""``ngsgd-plot``: convergence plots from training runs' ``metrics.jsonl``.

    ngsgd-plot runs/exp1 runs/exp2/metrics.jsonl --out-dir plots [--labels sgd,ng]

Each argument is a run directory (its ``metrics.jsonl`` is read) or a
metrics file.  Writes two PNGs: ``<prefix>_samples.png`` (objective and frame
accuracy against samples processed, all ranks) and ``<prefix>_time.png``
(the same against wall time).  Training figures are solid lines, validation
figures dashed (when the run had a validation set); ``--series valid`` (or
``train``) draws only those.  Records with an
``"event"`` key (e.g. a divergence that was rolled back) are not data points;
they are marked with a dotted vertical line where the run was when it
happened.

Needs matplotlib (``pip install 'ngsgd_mpi[plot]'``); it is imported only
when plotting.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

from .metrics import read_metrics


@dataclass
class Run:
    """One run's metrics with its legend label: ``records`` (one per averaging period, in
    order) and ``events`` (each with the samples and elapsed seconds of the record before it)."""
    label: str
    records: list[dict]
    events: list[dict] = field(default_factory=list)


def load_run(path: str, label: str | None = None) -> Run:
    """Read one metrics.jsonl (or a run directory holding one).  Raises
    ValueError naming the file and line for anything malformed."""
    metrics = read_metrics(path)
    if label is None:
        parent = os.path.basename(os.path.dirname(os.path.abspath(metrics.path)))
        label = parent or metrics.path
    return Run(label, metrics.periods, metrics.events)


def _time_axis(runs: list[Run]) -> tuple[float, str]:
    longest = max(r.records[-1]["elapsed"] for r in runs)
    if longest >= 3 * 3600:
        return 3600.0, "wall time (h)"
    if longest >= 3 * 60:
        return 60.0, "wall time (min)"
    return 1.0, "wall time (s)"


def plot_runs(runs: list[Run], out_prefix: str, series: str = "both") -> list[str]:
    """Write ``<out_prefix>_samples.png`` and ``<out_prefix>_time.png``;
    returns their paths.  ``series``: both, train or valid figures."""
    try:
        import matplotlib  # noqa: PLC0415 - optional dependency, only for plotting
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise RuntimeError("ngsgd-plot needs matplotlib: pip install 'ngsgd_mpi[plot]'") from exc
    time_scale, time_label = _time_axis(runs)
    axes_spec = [("samples", 1.0, "samples processed (all ranks)", "samples"),
                 ("elapsed", time_scale, time_label, "time")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = []
    for key, scale, xlabel, suffix in axes_spec:
        fig, (ax_obj, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
        for index, run in enumerate(runs):
            color = colors[index % len(colors)]
            x = [r[key] / scale for r in run.records]
            for ax, name, factor in ((ax_obj, "obj", 1.0), (ax_acc, "acc", 100.0)):
                if series != "valid":
                    ax.plot(x, [r[f"train_{name}"] * factor for r in run.records], "-o", ms=3,
                            color=color, label=f"{run.label} train")
                valid = [(xi, r[f"valid_{name}"] * factor) for xi, r in zip(x, run.records)
                         if isinstance(r.get(f"valid_{name}"), (int, float))
                         and math.isfinite(r[f"valid_{name}"])]
                if valid and series != "train":
                    ax.plot(*zip(*valid), "--s" if series == "both" else "-", ms=3, color=color,
                            label=f"{run.label} valid")
                for event in run.events:
                    ax.axvline(event[key] / scale, color=color, ls=":", lw=1)
            if run.events:     # one legend entry per run for its events
                ax_obj.plot([], [], ":", color=color,
                            label=f"{run.label}: {len(run.events)} event(s) "
                                  f"({', '.join(sorted({e['event'] for e in run.events}))})")
        if key == "samples":
            for ax in (ax_obj, ax_acc):
                ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax_obj.set(xlabel=xlabel, ylabel="log-likelihood per frame", title="objective")
        ax_acc.set(xlabel=xlabel, ylabel="frame accuracy (%)", title="accuracy")
        for ax in (ax_obj, ax_acc):
            ax.grid(alpha=0.3)
        ax_obj.legend(fontsize=8)
        fig.tight_layout()
        path = f"{out_prefix}_{suffix}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ngsgd-plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files")
    ap.add_argument("--labels", help="comma-separated legend labels, one per run "
                                     "(default: the run directory names)")
    ap.add_argument("--out-dir", default=".", help="where to write the PNGs")
    ap.add_argument("--prefix", default="convergence", help="PNG file name prefix")
    ap.add_argument("--series", choices=("both", "train", "valid"), default="both",
                    help="which figures to draw (default both)")
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [None] * len(args.runs)
    if len(labels) != len(args.runs):
        ap.error(f"--labels: expected {len(args.runs)} labels, got {len(labels)}")
    try:
        runs = [load_run(path, label) for path, label in zip(args.runs, labels)]
        os.makedirs(args.out_dir, exist_ok=True)
        paths = plot_runs(runs, os.path.join(args.out_dir, args.prefix), args.series)
    except (ValueError, RuntimeError) as exc:
        sys.stderr.write(f"ngsgd-plot: error: {exc}\n")
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
