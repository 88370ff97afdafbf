"""ngsgd-plot: metrics.jsonl -> convergence PNGs."""

import json
import sys
from importlib import metadata

import pytest

from ngsgd_mpi import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, periods, valid=True, event_after=None, extra_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in range(1, periods + 1):
            rec = {"period": p, "num_periods": periods, "samples": 1000 * p, "elapsed": 2.5 * p,
                   "train_obj": -2.0 + 0.1 * p, "train_acc": 0.2 + 0.02 * p,
                   "valid_obj": (-2.1 + 0.1 * p) if valid else None,
                   "valid_acc": (0.18 + 0.02 * p) if valid else None,
                   "frames_per_sec": 400.0, "time_allreduce": 0.01}
            f.write(json.dumps(rec) + "\n")
            if p == event_after:
                f.write(json.dumps({"period": p + 1, "event": "divergence",
                                    "message": "non-finite objective"}) + "\n")
        f.writelines(line + "\n" for line in extra_lines)
    return path


def test_plots_two_runs_with_an_event_and_no_validation(tmp_path):
    a = write_metrics(tmp_path / "ng" / "metrics.jsonl", 6, event_after=3)
    b = write_metrics(tmp_path / "sgd.jsonl", 4, valid=False)
    out = tmp_path / "plots"
    assert plot.main([str(a.parent), str(b), "--out-dir", str(out), "--labels", "ng,sgd"]) == 0
    for name in ("convergence_samples.png", "convergence_time.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    run = plot.load_run(str(a.parent))
    assert run.label == "ng" and len(run.records) == 6
    (event,) = run.events
    assert event["event"] == "divergence" and event["samples"] == 3000 and event["elapsed"] == 7.5


def test_redone_periods_keep_the_last_record(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", 3, extra_lines=[json.dumps(
        {"period": 2, "samples": 2000, "elapsed": 9.0, "train_obj": -1.0, "train_acc": 0.5})])
    run = plot.load_run(str(path))
    assert [r["period"] for r in run.records] == [1, 2]
    assert run.records[-1]["elapsed"] == 9.0


@pytest.mark.parametrize("lines,match", [
    (["{not json"], r"m.jsonl:1: not a JSON record"),
    (["[1, 2]"], r"m.jsonl:1: expected a JSON object"),
    ([json.dumps({"period": 1, "samples": 10, "elapsed": 1.0, "train_obj": -1.0})],
     r"m.jsonl:1: field 'train_acc' missing"),
    ([], r"m.jsonl: no period records"),
])
def test_bad_metrics_files_are_rejected(tmp_path, lines, match):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=match):
        plot.load_run(str(path))


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    assert plot.main([str(tmp_path / "missing"), "--out-dir", str(tmp_path)]) == 2
    assert "ngsgd-plot: error:" in capsys.readouterr().err
    a = write_metrics(tmp_path / "a.jsonl", 2)
    with pytest.raises(SystemExit):
        plot.main([str(a), "--labels", "x,y"])           # one run, two labels


def test_missing_matplotlib_gives_a_clear_error(tmp_path, monkeypatch):
    run = plot.load_run(str(write_metrics(tmp_path / "a.jsonl", 2)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'ngsgd_mpi\[plot\]'"):
        plot.plot_runs([run], str(tmp_path / "p"))


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("ngsgd-plot") == "ngsgd_mpi.plot:main"


def test_series_draws_only_the_chosen_figures(tmp_path, monkeypatch):
    a = write_metrics(tmp_path / "ng" / "metrics.jsonl", 5)
    drawn = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.plot

    def recording(self, *args, **kwargs):
        drawn.append(kwargs.get("label"))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    assert plot.main([str(a.parent), "--out-dir", str(tmp_path / "p"), "--series", "valid"]) == 0
    assert drawn and all(label == "ng valid" for label in drawn)
