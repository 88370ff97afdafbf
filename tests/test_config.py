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


def test_duplicate_keys_and_null_values_are_errors(tmp_path):
    path = write(tmp_path, "train_data: x\nalpha: 2.0\nalpha: 3.0\n")
    with pytest.raises(config.ConfigError, match=r"c.yaml: key 'alpha' appears twice \(line 3\)"):
        config.parse(["--config", path])
    path = write(tmp_path, "train_data: x\nlr_initial: null\n", "n.yaml")
    with pytest.raises(config.ConfigError, match=r"n.yaml: key 'lr_initial': option lr_initial needs a value"):
        config.parse(["--config", path])
    path = write(tmp_path, "train_data: x\nrank_in: 2.5\n", "f.yaml")
    with pytest.raises(config.ConfigError, match="option rank_in must be an integer"):
        config.parse(["--config", path])


def test_several_config_files_merge_in_order(tmp_path):
    a = write(tmp_path, "train_data: x\nlr_initial: 0.5\nrank_in: 7\n", "a.yaml")
    b = write(tmp_path, "rank_in: 9\n", "b.yaml")
    cfg = config.parse(["--config", a, "--config", b])
    assert (cfg.lr_initial, cfg.rank_in) == (0.5, 9)


def test_non_finite_numbers_are_refused():
    with pytest.raises(config.ConfigError, match="num_epochs: must be a finite number"):
        config.parse(["--train-data", "x", "--num-epochs", "inf"])


def test_environment_values_are_checked(monkeypatch):
    monkeypatch.setenv("NGSGD_RANK_IN", "many")
    with pytest.raises(config.ConfigError, match="environment variable NGSGD_RANK_IN"):
        config.parse(["--train-data", "x"])


def test_every_option_has_help_and_the_stored_config_omits_run_flags():
    from ngsgd_mpi.options import OPTIONS
    assert all(o.help for o in OPTIONS.values())
    cfg = config.parse(["--train-data", "x", "--resume"])
    assert cfg.resume and "resume" not in config.to_dict(cfg)
    assert "lr_initial" in config.to_dict(cfg)


def test_the_kaldi_recipe_config_is_complete_and_every_key_names_its_kaldi_option():
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "kaldi_nnet2_pnorm.yaml")
    cfg = config.parse(["--config", path])
    assert (cfg.ranks_initial, cfg.add_layers_period, cfg.prior_scale_power) == (1, 2, -0.25)
    assert cfg.lda_transform and cfg.first_period_pick_best and cfg.pick_best_after_growth
    assert cfg.combine_method == "lbfgs" and cfg.normalize_stddev and cfg.ng_reset_on_average
    with open(path) as f:
        lines = [line for line in f if line.strip() and not line.startswith("#")]
    assert lines and all("#" in line and line.split("#", 1)[1].strip() for line in lines)
