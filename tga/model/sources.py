"""tga/model/sources.py

Where a model, tokenizer or vision tower comes from, checked before anything is built, so that a wrong path is an
error naming the flag and the path instead of a transformers traceback about repository ids.

A value is a local path when it exists, or when it looks like one: it starts with `/`, `./`, `../` or `~`, or it is
not a valid hub id (`org/name` or `name`: a value with two slashes, spaces, ...). A local path that does not exist is
an error. A valid hub id that is not a local folder is left to the hub, except in offline mode (`HF_HUB_OFFLINE=1`),
where it must already be in the hub cache.
"""

from __future__ import annotations

import os

import huggingface_hub
from huggingface_hub.utils import HFValidationError, validate_repo_id

from tga.errors import ConfigError

LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
# One of these is in the cache for any model, tokenizer or image processor repository that was downloaded.
CACHE_PROBES = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


def looks_local(value: str) -> bool:
    if value.startswith(LOCAL_PREFIXES) or value in (".", ".."):
        return True
    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    return False


def in_hub_cache(repo_id: str) -> bool:
    return any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, name), str) for name in CACHE_PROBES)


def check_model_source(flag: str, value: str | None) -> None:
    """A ConfigError naming `--flag` and the path unless `value` is an existing path or a hub id that can load.

    Args:
        flag: the option name, without dashes (for the message).
        value: the option's value (None or empty: not set, nothing to check).
    """
    if not value or os.path.exists(os.path.expanduser(value)):
        return
    if looks_local(value):
        raise ConfigError(f"--{flag} {value}: no such file or folder")
    if huggingface_hub.is_offline_mode() and not in_hub_cache(value):
        raise ConfigError(f"--{flag} {value}: not a local folder, and not in the hub cache "
                          f"({huggingface_hub.constants.HF_HUB_CACHE}) while offline (HF_HUB_OFFLINE=1)")


def check_file(flag: str, value: str | None) -> None:
    """A ConfigError naming `--flag` unless `value` (when set) is an existing file."""
    if value and not os.path.isfile(os.path.expanduser(value)):
        raise ConfigError(f"--{flag} {value}: no such file")
