"""tga/serve/loading.py

Turns `tga serve`'s flags into a `Playground`: each `--model NAME=DIR` is loaded once by `tga chat`'s loader, each
listed defence is built over it by `tga chat --defense`'s builder (`build_defense`, with the defence flags given once
for all models; a CMRM calibration is per model, `--cmrm_file NAME=FILE`), and the judge is `tga evaluate`'s
(`--judge keyword`, or `--judge llm --judge_model DIR`, a local folder). Every mistake is a `ConfigError` naming the
flag, raised before any model is loaded where the flags alone show it.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from tga.defense.dispatch import OWN_FLAGS
from tga.errors import ConfigError
from tga.serve.session import Playground, StreamingChat

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


def parse_models(entries: list[str]) -> dict[str, str]:
    """`NAME=DIR` entries -> {name: folder}, in the order given; names are unique and plain."""
    models: dict[str, str] = {}
    for entry in entries:
        name, sep, folder = entry.partition("=")
        if not sep or not folder:
            raise ConfigError(f"--model: `{entry}` is not NAME=DIR (e.g. --model llava=runs/demo/seed0/llava/stage2)")
        if not NAME.match(name):
            raise ConfigError(f"--model: the name `{name}` must be 1-40 letters, digits, '.', '_' or '-'")
        if name in models:
            raise ConfigError(f"--model: the name `{name}` is given twice")
        models[name] = folder
    return models


def cmrm_files(entries: list[str] | None, models: dict[str, str]) -> dict[str, str]:
    """`--cmrm_file` entries -> {model name: calibration file}; a bare FILE names the one model's file."""
    files: dict[str, str] = {}
    for entry in entries or []:
        name, sep, path = entry.partition("=")
        if not sep:
            if len(models) != 1:
                raise ConfigError(f"--cmrm_file: `{entry}` names no model; with several models give NAME=FILE each")
            name, path = next(iter(models)), entry
        if name not in models:
            raise ConfigError(f"--cmrm_file: `{name}` is not a --model name ({', '.join(models)})")
        files[name] = path
    return files


def check_flags(args: argparse.Namespace, models: dict[str, str]) -> None:
    """A defence's own flags need that defence among `--defense`; CMRM needs a calibration for every model."""
    for defense, flags in OWN_FLAGS.items():
        for flag in flags:
            if getattr(args, flag, None) is not None and defense not in args.defense:
                raise ConfigError(f"--{flag} applies to --defense {defense}, which is not among --defense "
                                  f"{' '.join(args.defense)}")
    if len(set(args.defense)) != len(args.defense):
        raise ConfigError(f"--defense: a defence is listed twice ({' '.join(args.defense)})")
    if "cmrm" in args.defense:
        missing = [name for name in models if name not in cmrm_files(args.cmrm_file, models)]
        if missing:
            raise ConfigError(f"--defense cmrm needs a calibration (`tga calibrate cmrm`) for each model; "
                              f"--cmrm_file gives none for {', '.join(missing)}")
    if args.judge == "llm" and not args.judge_model:
        raise ConfigError("--judge llm needs --judge_model DIR (a local Hugging Face chat model folder)")
    if args.judge != "llm" and args.judge_model:
        raise ConfigError("--judge_model applies to --judge llm")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")


def load_judge(args: argparse.Namespace) -> Any:
    from tga.safety.judge import get_judge

    if args.judge == "llm":
        return get_judge("llm", model_dir=args.judge_model, device=args.device, dtype=args.dtype)
    return get_judge(args.judge)


def build_playground(args: argparse.Namespace, *, log: Any = print) -> Playground:
    """Check the flags, load every model once, build each model x defence and the judge."""
    from tga.defense.dispatch import build_defense
    from tga.safety.io import ensure_model_dir
    from tga.safety.loading import load_chat

    models = parse_models(args.model)
    check_flags(args, models)
    for name, folder in models.items():
        ensure_model_dir(folder, f"--model {name}")
    calibrations = cmrm_files(args.cmrm_file, models)
    chats, defenses = {}, {}
    for name, folder in models.items():
        log(f"loading {name} from {folder}")
        # the defences are built over the model as it streams, so that their columns show each pass as it is decoded
        chats[name] = StreamingChat(load_chat(folder, device=args.device, dtype=args.dtype))
        defenses[name] = {}
        for defense in args.defense:
            if defense == "none":
                defenses[name][defense] = None  # streamed straight from the model (tga.safety.chat.StreamedAnswer)
                continue
            # this defence's flags only: the others' are for their own columns (build_defense refuses them)
            others = {flag: None for other, own in OWN_FLAGS.items() if other != defense for flag in own}
            flags = argparse.Namespace(**{**vars(args), **others, "defense": defense})
            if defense == "cmrm":
                flags.cmrm_file = calibrations[name]
            defenses[name][defense] = build_defense(flags, chat=chats[name])
    judge = load_judge(args)
    return Playground(chats, defenses, judge, max_new_tokens=args.max_new_tokens)
