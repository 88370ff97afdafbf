import pytest

from ngsgd_mpi import config


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_precedence_cli_over_env_over_file_over_default(tmp_path, monkeypatch):
    path = write(tmp_path, "train_data: d/*.h5\nlr_initial: 0.5\nrank_in: 7\nalpha: 2.0\n")
    monkeypatch.setenv("NGSGD_RANK_IN", "9")
    monkeypatch.setenv("NGSGD_ALPHA", "3.0")
    cfg = config.parse(["--config", path, "--alpha", "1.5"])
    assert cfg.lr_initial == 0.5          # file over default
    assert cfg.rank_in == 9               # env over file
    assert cfg.alpha == 1.5               # CLI over env
    assert cfg.rank_out == 80             # default


def test_dash_and_underscore_flags_and_bools(tmp_path):
    cfg = config.parse(["--train-data", "x", "--lr_final", "0.002", "--ng-reset-on-average", "true",
                        "--num-epochs", "1"])
    assert cfg.lr_final == 0.002 and cfg.ng_reset_on_average is True
    path = write(tmp_path, "train_data: x\nlr_scale_by_ranks: false\nnum_epochs: 1\n")
    assert config.parse(["-c", path]).lr_scale_by_ranks is False


def test_unknown_and_nested_keys_are_rejected_with_file_name(tmp_path):
    path = write(tmp_path, "train_data: x\nlearning_rate: 0.1\n")
    with pytest.raises(config.ConfigError, match=r"c.yaml: unknown key 'learning_rate'"):
        config.parse(["--config", path])
    path = write(tmp_path, "train_data: x\nalpha: {a: 1}\n", "n.yaml")
    with pytest.raises(config.ConfigError, match=r"n.yaml: key 'alpha' must be a single value"):
        config.parse(["--config", path])


@pytest.mark.parametrize("flag,value,match", [
    ("--lr-initial", "-0.1", "lr_initial: must be a positive number"),
    ("--rank-in", "0", "rank_in: must be >= 1"),
    ("--context", "-1", "context: must be >= 0"),
    ("--pnorm-input-dim", "301", "multiple of pnorm_output_dim"),
    ("--num-samples-history", "0", "num_samples_history"),
])
def test_invalid_values(flag, value, match):
    with pytest.raises(config.ConfigError, match=match):
        config.parse(["--train-data", "x", "--num-epochs", "1", flag, value])


def test_training_length_is_required():
    with pytest.raises(config.ConfigError, match="total_samples"):
        config.parse(["--train-data", "x", "--num-epochs", "0"])


def test_bad_choice_exits_with_usage_error():
    with pytest.raises(SystemExit) as exc:
        config.parse(["--train-data", "x", "--optimizer", "adam"])
    assert exc.value.code == 2


def test_shipped_configs_parse():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    shipped = sorted((root / "configs").glob("*.yaml"))
    assert shipped, "configs/ must ship example configs"
    for path in shipped:
        cfg = config.parse(["--config", str(path), "--train-data", "x"])
        assert cfg.optimizer in ("sgd", "ng-online", "ng-simple")


def test_train_paths(tmp_path):
    for i in (0, 1, 2, 10):
        (tmp_path / f"train.{i}.h5").write_text("")
    expected = [str(tmp_path / f"train.{i}.h5") for i in (0, 1, 2, 10)]     # natural order
    assert config.train_paths(str(tmp_path)) == expected
    assert config.train_paths(str(tmp_path / "train.*.h5")) == expected
    with pytest.raises(config.ConfigError, match="no partition files match"):
        config.train_paths(str(tmp_path / "nothing*.h5"))
