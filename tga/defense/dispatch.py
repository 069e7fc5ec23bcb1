"""tga/defense/dispatch.py

One option, `--defense none|ecso|cmrm|adashield`, for every command that answers requests (`tga evaluate dsr|vqa`,
`tga chat`): `add_defense_args` adds it and each defence's own flags to a parser, `build_defense` turns the parsed
flags into a defence over a `ChatModel` (or over any `answer(request, image) -> text` function, for front-ends that
bring their own), and `defense_settings` says what produced the answers, for the resumable answer files. A defence is
a callable `(images, requests) -> list[Reply]`; `none` answers once, and so costs what an undefended request costs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from tga.errors import ConfigError

DEFENSES = ("none", "ecso", "cmrm", "adashield")
# each defence's own flags: given with another defence they are an error, not silently ignored
OWN_FLAGS = {
    "adashield": ("adashield_prompt", "adashield_position"),
    "ecso": ("ecso_mode", "ecso_check_prompt", "ecso_caption_prompt", "ecso_answer_prompt"),
    "cmrm": ("cmrm_file", "cmrm_alpha", "cmrm_layers"),
}


class NoDefense:
    """Answers each request once, as asked."""

    name = "none"

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def settings(self) -> dict:
        return {}  # answers without a defence keep the settings they always had, so earlier answer files resume

    def __call__(self, images: Sequence[Image.Image | None], requests: Sequence[str]) -> list:
        from tga.defense.base import Reply, cost_of

        return [Reply(u.text, cost_of([u], u.prompt_tokens)) for u in self.backend.generate(images, requests)]


def add_defense_args(parser: argparse.ArgumentParser) -> None:
    """Add `--defense` and the flags of each defence (docs/evaluation.md#inference-time-defences)."""
    group = parser.add_argument_group("inference-time defence (docs/evaluation.md#inference-time-defences)")
    group.add_argument("--defense", default="none", choices=DEFENSES,
                       help="inference-time defence: none, ecso (Gou et al. 2024), cmrm (Liu et al. 2025) or "
                            "adashield (AdaShield-S, Wang et al. 2024)")
    add_adashield_args(group)
    add_ecso_args(group)
    add_cmrm_args(group)


def add_adashield_args(group: Any) -> None:
    from tga.defense.adashield import POSITIONS

    group.add_argument("--adashield_prompt", default=None,
                       help="AdaShield-S defence prompt (default: the paper's static prompt)")
    group.add_argument("--adashield_position", default=None, choices=list(POSITIONS),
                       help="where the AdaShield-S prompt goes: before the request (default) or after it")


def add_ecso_args(group: Any) -> None:
    from tga.defense.ecso import MODES

    group.add_argument("--ecso_mode", default=None, choices=list(MODES),
                       help="ECSO: check = caption only answers the model judges harmful (default, the paper's); "
                            "always = caption every image request")
    group.add_argument("--ecso_check_prompt", default=None,
                       help="ECSO harm-check template with {request} and {answer} (default: the built-in one)")
    group.add_argument("--ecso_caption_prompt", default=None,
                       help="ECSO caption template, query-aware with {request} (default: the built-in one) or plain")
    group.add_argument("--ecso_answer_prompt", default=None,
                       help="ECSO template for the text-only answer, with {caption} and {request} (default: built-in)")


def add_cmrm_args(group: Any, *, per_model: bool = False) -> None:
    if per_model:  # a calibration belongs to one model: front-ends serving several name each model's file
        group.add_argument("--cmrm_file", default=None, action="append", metavar="[NAME=]FILE",
                           help="CMRM calibration file from `tga calibrate cmrm`, as NAME=FILE for each --model NAME "
                                "(a bare FILE with one model); required with --defense cmrm")
    else:
        group.add_argument("--cmrm_file", default=None,
                           help="CMRM calibration file from `tga calibrate cmrm` (required with --defense cmrm)")
    group.add_argument("--cmrm_alpha", type=float, default=None,
                       help="CMRM: the image-conditioned states move back by alpha x the calibrated shift (default 1)")
    group.add_argument("--cmrm_layers", default=None,
                       help="CMRM: hidden-state layers to shift, e.g. all, 8-16 or 4,8 (default: all)")


def check_flags(args: argparse.Namespace) -> None:
    """Flags of a defence other than the chosen one are an error naming both."""
    for defense, flags in OWN_FLAGS.items():
        if defense == args.defense:
            continue
        for flag in flags:
            if getattr(args, flag, None) is not None:
                raise ConfigError(f"--{flag} applies to --defense {defense}, not --defense {args.defense}")


def build_defense(args: argparse.Namespace, *, chat: Any = None,
                  answer: Callable[[str, Image.Image | None], str] | None = None) -> Any:
    """The defence the flags ask for, over a `ChatModel` (`chat`) or an answer function (`answer`).

    Args:
        args: parsed flags (`add_defense_args`) with `max_new_tokens`.
        chat: a `tga.inference.ChatModel` (token counts known; required by cmrm, which hooks the model).
        answer: instead of `chat`, any `answer(request, image) -> text`.

    Returns:
        A callable (images, requests) -> list of `tga.defense.base.Reply`, with `name` and `settings()`.
    """
    from tga.defense.base import AnswerBackend, ChatBackend

    check_flags(args)
    if (chat is None) == (answer is None):
        raise ValueError("build_defense needs exactly one of chat or answer")
    backend = ChatBackend(chat, max_new_tokens=args.max_new_tokens) if chat is not None else AnswerBackend(answer)
    if args.defense == "none":
        return NoDefense(backend)
    if args.defense == "adashield":
        from tga.defense.adashield import AdaShield

        return AdaShield(backend, prompt=args.adashield_prompt, position=args.adashield_position or "before")
    if args.defense == "ecso":
        from tga.defense.ecso import ECSO

        return ECSO(backend, mode=args.ecso_mode or "check", check_prompt=args.ecso_check_prompt,
                    caption_prompt=args.ecso_caption_prompt, answer_prompt=args.ecso_answer_prompt)
    if args.defense == "cmrm":
        from tga.defense.cmrm import CMRM, load_calibration

        if chat is None:
            raise ConfigError("--defense cmrm shifts the model's hidden states; it needs the model, not an answer "
                              "function")
        if not args.cmrm_file:
            raise ConfigError("--defense cmrm needs --cmrm_file (from `tga calibrate cmrm`)")
        return CMRM(chat, backend, load_calibration(args.cmrm_file), alpha=1.0 if args.cmrm_alpha is None
                    else args.cmrm_alpha, layers=args.cmrm_layers or "all")
    raise ConfigError(f"--defense: `{args.defense}` is not supported (choose from {', '.join(DEFENSES)})")
