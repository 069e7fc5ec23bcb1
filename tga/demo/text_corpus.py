"""tga/demo/text_corpus.py

The text the demo's LLM is pretrained on, and its tokenizer. Three kinds of documents: captions (the world's
language), "repeat" documents (`caption \\n caption`, a generic copy skill that lets a frozen LLM be steered by a
projector in stage 1) and chat instructions about a scene given in words, rendered with the project's own
`mistral_instruct` template and tokenizer code so that the format is identical to what VL training uses. Describe
requests about a scene with a toxic object are answered with the refusal: the LLM's text safety mechanism.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm
import torch
from transformers import LlamaTokenizer, PreTrainedTokenizerBase

from tga.data.templates import Message, get_template
from tga.data.tokenize import IGNORE_INDEX, encode_segments
from tga.demo import tasks
from tga.demo.datasets import text_conversation
from tga.demo.world import CAPTION_STYLES, Scene, canonical_caption, styled_caption
from tga.model.tokenizer import image_token_id, load_tokenizer

TEMPLATE = "mistral_instruct"
CONTROL_SYMBOLS = ["[INST]", "[/INST]"]  # single pieces, so the chat frame costs two tokens per turn


@dataclass(frozen=True)
class Document:
    kind: str  # "caption" | "repeat" | "chat"
    text: str = ""
    turns: tuple[tasks.QA, ...] = ()
    scene_text: str = ""


def chat_messages(scene_text: str, turns: tuple[tasks.QA, ...] | list[tasks.QA]) -> list[Message]:
    """The turns as user/assistant messages; the first user turn carries the scene in words."""
    messages = []
    for index, qa in enumerate(turns):
        messages.append(Message("user", tasks.text_prompt(scene_text, qa.question) if index == 0 else qa.question))
        messages.append(Message("assistant", qa.answer))
    return messages


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user: str) -> str:
    """The prompt text of a one-turn request, ending where the model's answer begins (for generation)."""
    segments = get_template(TEMPLATE).render([Message("user", user)], add_generation_prompt=True)
    return "".join(segment.text for segment in segments)


def encode_document(tokenizer: PreTrainedTokenizerBase, doc: Document) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of a document: chat labels only on answers, plain documents on every token."""
    if doc.kind == "chat":
        segments = get_template(TEMPLATE).render(chat_messages(doc.scene_text, doc.turns))
        enc = encode_segments(segments, tokenizer, image_token_id=image_token_id(tokenizer), num_image_tokens=1)
        return enc.input_ids, enc.labels
    ids = torch.tensor(tokenizer(doc.text + tokenizer.eos_token)["input_ids"], dtype=torch.long)
    labels = ids.clone()
    labels[0] = IGNORE_INDEX  # BOS is never a target
    return ids, labels


def sample_documents(scenes: list[Scene], n: int, rng: np.random.Generator, *, mix: tuple[float, float, float],
                     toxic_share: float) -> list[Document]:
    """`n` documents with the (caption, repeat, chat) `mix`; chats over-sample toxic scenes to `toxic_share`."""
    toxic = [s for s in scenes if s.toxic]
    benign = [s for s in scenes if not s.toxic]
    docs = []
    kinds = rng.choice(["caption", "repeat", "chat"], size=n, p=list(mix))
    for kind in kinds:
        if kind == "chat":
            pool = toxic if toxic and rng.random() < toxic_share else benign or toxic
            scene = pool[int(rng.integers(len(pool)))]
            turns = tuple(text_conversation(scene, rng, describe_prob=0.6))
            docs.append(Document("chat", turns=turns, scene_text=canonical_caption(scene)))
            continue
        scene = scenes[int(rng.integers(len(scenes)))]
        caption = styled_caption(scene, str(rng.choice(CAPTION_STYLES)))
        docs.append(Document(kind, text=caption if kind == "caption" else f"{caption}\n{caption}"))
    return docs


def tokenizer_corpus(docs: list[Document]) -> list[str]:
    """Plain text of documents for training the sentencepiece model (special tokens left out)."""
    template = get_template(TEMPLATE)
    texts = []
    for doc in docs:
        if doc.kind == "chat":
            segments = template.render(chat_messages(doc.scene_text, doc.turns))
            texts.append("".join(s.text for s in segments).replace("</s>", " "))
        else:
            texts.append(doc.text)
    return texts


def build_tokenizer(texts: list[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerBase:
    """Train a sentencepiece BPE model (byte fallback, `[INST]`/`[/INST]` pieces) and save it as a fast Llama tokenizer.

    The saved folder (tokenizer.json + tokenizer_config.json, BOS `<s>`, EOS `</s>`, UNK `<unk>` also used as pad,
    and the `<image>` special token) loads with `AutoTokenizer` and `tga.model.tokenizer.load_tokenizer`.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, user_defined_symbols=CONTROL_SYMBOLS, character_coverage=1.0, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, num_threads=1, minloglevel=2,
        hard_vocab_limit=False,  # tiny corpora may not support the requested size
        # [IMPORTANT] lines of the chat corpus are long; the default limit would silently drop them
        max_sentence_length=16384,
    )
    with tempfile.TemporaryDirectory() as scratch:
        with open(os.path.join(scratch, "tokenizer.model"), "wb") as handle:
            handle.write(model.getvalue())
        LlamaTokenizer.from_pretrained(scratch, add_bos_token=True, legacy=False).save_pretrained(out_dir)
    tokenizer = load_tokenizer(out_dir)  # adds <image> and the pad token the way training loads it
    tokenizer.save_pretrained(out_dir)
    return tokenizer
