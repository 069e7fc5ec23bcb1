"""tga/model/tokenizer.py

Loads the LLM's tokenizer and prepares it for a VLM: a fast tokenizer (character offsets are how label masks and
spans are computed), the `<image>` placeholder as an added special token (one id, expanded later to one token per
image patch), a pad token, and right padding for training.
"""

from __future__ import annotations

import os

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from tga.data.templates import IMAGE_PLACEHOLDER
from tga.errors import ConfigError


def load_tokenizer(
    name_or_path: str, *, model_max_length: int | None = None, padding_side: str = "right"
) -> PreTrainedTokenizerBase:
    """The LLM tokenizer with `<image>` and a pad token added.

    A folder that holds only a sentencepiece `tokenizer.model` (no tokenizer.json / tokenizer_config.json) is read
    as a Llama-family tokenizer: AutoTokenizer would otherwise build a generic backend that tokenizes differently.
    """
    is_bare_sentencepiece = (
        os.path.isdir(name_or_path)
        and os.path.exists(os.path.join(name_or_path, "tokenizer.model"))
        and not os.path.exists(os.path.join(name_or_path, "tokenizer.json"))
        and not os.path.exists(os.path.join(name_or_path, "tokenizer_config.json"))
    )
    if is_bare_sentencepiece:
        tokenizer = LlamaTokenizer.from_pretrained(name_or_path, add_bos_token=True, legacy=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if not tokenizer.is_fast:
        raise ConfigError(
            f"the tokenizer of `{name_or_path}` is not a fast tokenizer; tga needs character offsets to build exact "
            "label masks (install `tokenizers` and use a model folder with tokenizer.json)"
        )
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    if tokenizer.pad_token is None:
        # LLaVA's convention for Llama/Mistral: pad with <unk>, which these vocabularies have and never train on.
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = padding_side
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
