"""Options that explain themselves: every option of every parser (scripts/pretrain.py, scripts/finetune.py,
scripts/unlearn.py and every `tga` subcommand) has a help line, options of a set list their choices, one boolean
style (`--flag` or `--flag true`) everywhere, and no parser expands abbreviations."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from tga.cli import build_parser
from tga.cli import main as tga_main
from tga.config import ARGUMENT_CLASSES, TrainingArguments
from tga.options import OptionParser
from tga.unlearn.config import UnlearnArguments

PARSERS = {
    "scripts/pretrain.py, scripts/finetune.py": lambda: OptionParser(ARGUMENT_CLASSES),
    "scripts/unlearn.py": lambda: OptionParser((UnlearnArguments, TrainingArguments)),
    "tga": build_parser,
}


def walk(parser: argparse.ArgumentParser, name: str):
    """(command, action) for every option and positional of a parser and of its subcommands, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, subparser in action.choices.items():
                yield from walk(subparser, f"{name} {command}")
        else:
            yield name, action


def test_every_option_of_every_parser_has_a_help_line():
    missing, seen = [], 0
    for label, make in PARSERS.items():
        for command, action in walk(make(), label):
            seen += 1
            if not (action.help or "").strip():
                missing.append(f"{command}: {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "options without help:\n" + "\n".join(missing)
    assert seen > 300  # the walk reached the training options and every subcommand's


def test_options_of_a_set_list_their_choices_in_help():
    text = OptionParser(ARGUMENT_CLASSES).format_help()
    for flag, choices in (("--tga_form", "{paper,released,contrastive,request}"), ("--tga_target", "{live,frozen}"),
                          ("--image_aspect_ratio", "{pad,resize}"), ("--lora_bias", "{none,lora_only,all}"),
                          ("--mm_vision_select_feature", "{cls_patch,patch}")):
        assert f"{flag} {choices}" in text, flag
    assert "--reference {auto,copy,adapter}" in OptionParser((UnlearnArguments, TrainingArguments)).format_help()


TRAINING_PARSER = OptionParser(ARGUMENT_CLASSES)


def parse_tga(argv):
    return build_parser().parse_known_args(argv)[0]


@pytest.mark.parametrize("given, expected", [([], False), (["--tga"], True), (["--tga", "true"], True),
                                             (["--tga", "false"], False), (["--tga=yes"], True), (["--tga", "0"], False)])
def test_one_boolean_style_in_training_and_in_the_tga_commands(given, expected):
    assert TRAINING_PARSER.parse_args(given).tga is expected
    assert parse_tga(["data", "check", "records.json", *given, "--json"]).tga is expected


def test_the_tga_commands_refuse_abbreviations_and_bad_switch_values():
    for argv, message in ((["data", "check", "records.json", "--tg"], "unrecognized arguments: --tg"),
                          (["data", "check", "records.json", "--tga", "maybe"], "argument --tga: Truthy value expected: got maybe"),
                          (["data", "check", "r.json", "--use_retrieved"], "unrecognized arguments: --use_retrieved")):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
            tga_main(argv)
        assert exit_info.value.code == 2 and message in stderr.getvalue(), (argv, stderr.getvalue())


@pytest.mark.parametrize("word", ["yes", "No", "T", "f", "Y", "n", "1", "0", "TRUE", "false", "maybe", "", "2"])
def test_a_tga_switch_reads_a_word_as_training_does(word):
    from transformers.hf_argparser import string_to_bool as training_reads

    from tga.cli.switches import string_to_bool as tga_reads

    def outcome(read):
        try:
            return read(word)
        except argparse.ArgumentTypeError as error:
            return str(error)

    assert outcome(tga_reads) == outcome(training_reads)
