"""ngsgd-train's configuration: the options of ``options.py`` from the command line, the
environment and YAML files.

Precedence: command line > environment (``NGSGD_<OPTION>``, e.g. ``NGSGD_LR_INITIAL``) >
config files (``--config x.yaml``; several are merged in the order given, later files win) >
the defaults.  Every option is a flag spelled with dashes or underscores (``--lr-initial`` /
``--lr_initial``); a boolean flag alone means true (``--resume``).  Config files are flat YAML
mappings of option names; an unknown or repeated key, a nested or null value is an error
naming the file.
"""

from __future__ import annotations

import argparse
import os

import yaml

from .options import OPTIONS, OPTIONS_LIST, ConfigError, TrainConfig, add_arguments, convert_given, saved_dict

ENV_PREFIX = "NGSGD_"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ngsgd-train", usage="%(prog)s [--config YAML ...] [--OPTION VALUE ...]",
        description="Train a DNN with NG-SGD and MPI parameter averaging "
                    f"(precedence: flags > {ENV_PREFIX}<OPTION> environment > --config files > defaults).")
    parser.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                        help="flat YAML config file; several are merged in order (later files win)")
    add_arguments(parser, OPTIONS_LIST)
    return parser


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (PyYAML silently keeps the last)."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _safe_load_strict(stream):
    """yaml.safe_load with _StrictLoader: plain YAML data only, and no key given twice."""
    loader = _StrictLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_config_file(path: str) -> dict:
    """{option: value} of one flat YAML file, converted to the options' types."""
    where = f"config file {path}"
    try:
        with open(path, encoding="utf-8") as f:
            content = _safe_load_strict(f)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror})") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{where}: expected a flat mapping of option: value")
    values = {}
    for key, value in content.items():
        option = OPTIONS.get(str(key).replace("-", "_"))
        if option is None:
            raise ConfigError(f"{where}: unknown key {key!r} (see ngsgd-train --help for the options)")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: key {key!r} must be a single value (files are flat)")
        values[option.name] = option.convert(value, f"{where}: key {key!r}")
    return values


def parse(argv=None, environ=None) -> TrainConfig:
    """The validated TrainConfig; raises ConfigError (bad file or value) or SystemExit
    (unknown flag, bad choice: argparse's usage error, exit 2)."""
    environ = os.environ if environ is None else environ
    given = vars(build_parser().parse_args(argv))
    values: dict = {}
    for path in given.pop("config"):
        values.update(read_config_file(path))
    for option in OPTIONS_LIST:
        env = ENV_PREFIX + option.name.upper()
        if env in environ:
            values.update(convert_given({option.name: environ[env]}, [option], f"environment variable {env}"))
    values.update(convert_given(given, OPTIONS_LIST))
    return TrainConfig(**values)


def to_dict(cfg: TrainConfig) -> dict:
    """The stored training options (what goes into every model file's train_config)."""
    return saved_dict(cfg)


def format_resolved(cfg: TrainConfig) -> str:
    return "\n".join(f"  {name}: {value!r}" for name, value in cfg.to_dict().items())
