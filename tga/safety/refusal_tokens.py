"""tga/safety/refusal_tokens.py

What the logit-lens analyses look for: the refusal phrases (their first tokens are the refusal tokens of
Algorithm 1, `tga analyze activation`, and of the patching effect, `tga analyze patching`) and Algorithm 1's two
rules. Tokenizer-only and free of torch, so that the command line can show them in `--help` at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tga.errors import ConfigError

DEFAULT_REFUSAL_PHRASES: tuple[str, ...] = ("Sorry", "I cannot", "I apologize")
RULES = ("paper", "released")


def refusal_token_ids(tokenizer: Any, phrases: Sequence[str] = DEFAULT_REFUSAL_PHRASES) -> list[int]:
    """First token ids of refusal phrases, with and without a leading space.

    Three spellings per phrase: as given, after a space, and directly after a newline (which yields the
    no-space token for sentencepiece tokenizers that otherwise always add the word-start marker).
    Whitespace-only tokens are skipped.

    Args:
        tokenizer: an HF tokenizer.
        phrases: the refusal phrases.

    Returns:
        Distinct token ids, in first-seen order.
    """
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for phrase in phrases:
        for variant, skip in ((phrase, 0), (" " + phrase, 0), ("\n" + phrase, len(newline))):
            tokens = tokenizer(variant, add_special_tokens=False)["input_ids"][skip:]
            first = next((t for t in tokens if tokenizer.decode([t]).strip()), None)
            if first is not None and first not in ids:
                ids.append(first)
    if not ids:
        raise ConfigError(f"--refusal_tokens: no token ids found for {list(phrases)}")
    return ids
