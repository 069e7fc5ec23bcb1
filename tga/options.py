"""tga/options.py

From a YAML config and command-line flags to argument dataclasses, with every option spelled exactly.

A config is a record of an experiment, so what it says must be exactly what ran: an unknown key or flag, and a
prefix of a real option (which argparse would otherwise expand: `learning_rat` -> `learning_rate`), is a
`ConfigError` naming the file or the flag and the closest valid option, raised before anything is loaded. A value
argparse refuses (a choice outside the allowed set, a number that is not one) is a `ConfigError` naming the option,
and the YAML file when the value came from it.

A config may extend another with `base: other.yaml` (resolved relative to the file; the child's keys win, `key:
null` in the child returns the option to its default; cycles are refused by name).
"""

from __future__ import annotations

import difflib
import json
import os
import re

import yaml
from transformers import HfArgumentParser

from tga.errors import ConfigError

BASE_KEY = "base"


def load_config(path: str) -> dict:
    """A YAML config as an option -> value mapping, its `base:` chain resolved (the child's keys win)."""
    return _load(path, ())


def config_chain(path: str) -> list[str]:
    """The files a config is read from: itself, then its `base:` chain (what a cache key of the config must hash)."""
    chain = [path]
    while True:
        try:
            with open(chain[-1], encoding="utf-8-sig") as handle:
                values = yaml.safe_load(handle)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return chain  # load_config names the problem when the config is parsed
        base = values.get(BASE_KEY) if isinstance(values, dict) else None
        if not isinstance(base, str) or not base:
            return chain
        following = os.path.join(os.path.dirname(chain[-1]), os.path.expanduser(base))
        if os.path.realpath(following) in {os.path.realpath(item) for item in chain} or not os.path.isfile(following):
            return chain  # load_config names the cycle or the missing file
        chain.append(following)


def _load(path: str, chain: tuple[str, ...]) -> dict:
    real = os.path.realpath(path)
    if real in chain:
        names = [os.path.relpath(item) for item in (*chain[chain.index(real):], real)]
        raise ConfigError(f"{path}: `{BASE_KEY}` cycle: {' -> '.join(names)}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}" + (f" (the {BASE_KEY} of {chain[-1]})" if chain else ""))
    with open(path, encoding="utf-8-sig") as handle:
        try:
            values = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:  # includes python/object tags, which the safe loader refuses
            raise ConfigError(f"{path}: not a valid YAML config ({error})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config must be a mapping of option: value")
    base = values.pop(BASE_KEY, None)
    if base is None:
        return values
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: `{BASE_KEY}` must be the path of another config")
    parent = _load(os.path.join(os.path.dirname(path), os.path.expanduser(base)), (*chain, real))
    return {**parent, **values}


def closest(name: str, options: set[str]) -> str | None:
    """The valid option a mistyped or shortened one most likely meant (a prefix first: argparse's abbreviations)."""
    options = {option for option in options if "-" not in option}  # HF's dashed aliases are accepted, not suggested
    prefixed = sorted(option for option in options if option.startswith(name))
    if prefixed:
        return min(prefixed, key=len)
    matches = difflib.get_close_matches(name, sorted(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_option(name: str, options: set[str], where: str | None = None) -> ConfigError:
    suggestion = closest(name, options)
    if where is None:
        hint = f" (did you mean --{suggestion}?)" if suggestion else ""
        return ConfigError(f"unknown option --{name}{hint}")
    hint = f" (did you mean {suggestion}?)" if suggestion else ""
    return ConfigError(f"{where}: unknown option `{name}`{hint}")


def yaml_to_argv(path: str, options: set[str] | None = None) -> list[str]:
    """A YAML config as command-line flags (so that later flags override it); with `options`, every key must be one."""
    argv = []
    for key, value in load_config(path).items():
        if options is not None and str(key) not in options:
            raise unknown_option(str(key), options, path)
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(item) for item in value)
        elif isinstance(value, dict):
            value = json.dumps(value)
        argv += [f"--{key}", str(value)]
    return argv


def config_position(argv: list[str]) -> int | None:
    """Where the positional YAML path stands (anywhere: launchers prepend `--local_rank=N`), or None."""
    for index, token in enumerate(argv):
        is_flag_value = index > 0 and argv[index - 1].startswith("--") and "=" not in argv[index - 1]
        if token.endswith((".yaml", ".yml")) and not token.startswith("--") and not is_flag_value:
            return index
    return None


def config_argv(argv: list[str], options: set[str] | None = None) -> list[str]:
    """Expand the positional YAML path into flags that the other flags override."""
    index = config_position(argv)
    if index is None:
        return list(argv)
    return yaml_to_argv(argv[index], options) + argv[:index] + argv[index + 1 :]


def flag_names(argv: list[str]) -> list[str]:
    """The option names of the `--name` / `--name=value` tokens of an argv list, in order."""
    return [token[2:].split("=", 1)[0] for token in argv if token.startswith("--") and len(token) > 2]


class OptionParser(HfArgumentParser):
    """HfArgumentParser that takes option names exactly (no abbreviations) and raises `ConfigError`s.

    Args:
        dataclass_types: the argument dataclasses.
        origins: option -> the YAML file its value came from, to name the file in an error about that value.
    """

    def __init__(self, dataclass_types, origins: dict[str, str] | None = None):
        super().__init__(dataclass_types, allow_abbrev=False)
        self.origins = origins or {}

    @property
    def options(self) -> set[str]:
        """Every `--name` this parser accepts (fields, and the `no_` forms of booleans that default to true)."""
        return {name[2:] for name in self._option_string_actions if name.startswith("--")}

    def error(self, message: str):
        """argparse's exit on a bad value becomes a ConfigError naming the option (and the YAML file it came from)."""
        message = re.sub(r"^argument (--\w+)(/--[\w-]+)+", r"argument \1", message)  # not HF's dashed alias too
        match = re.match(r"argument --(\w+)", message)
        if match and match.group(1) in self.origins:
            raise ConfigError(f"{self.origins[match.group(1)]}: {message}")
        raise ConfigError(message)


def parse_dataclasses(dataclass_types, argv: list[str], defaults: list[str] = ()) -> tuple:
    """Parse `defaults` + YAML + flags into the dataclasses; every key and flag must be an exact option name.

    Args:
        dataclass_types: the argument dataclasses, in the order of the returned tuple.
        argv: command-line tokens (an optional YAML path anywhere, then flags).
        defaults: flags placed before the YAML's, so that the YAML and the flags override them.

    Returns:
        One instance per dataclass.
    """
    options = OptionParser(dataclass_types).options
    index = config_position(argv)
    config_flags, origins = [], {}
    if index is not None:
        config_flags = yaml_to_argv(argv[index], options)
        given = set(flag_names(argv))
        origins = {name: argv[index] for name in flag_names(config_flags) if name not in given}
        argv = argv[:index] + argv[index + 1 :]
    for name in flag_names(argv):
        if name not in options:
            raise unknown_option(name, options)
    parser = OptionParser(dataclass_types, origins)
    return parser.parse_args_into_dataclasses(args=[*defaults, *config_flags, *argv])
