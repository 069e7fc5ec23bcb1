"""Templates + tokenization on the real Mistral-7B tokenizer: label masks, image expansion, retrieved/caption spans."""

import pytest
import torch

from tga.data.templates import Message, get_template
from tga.data.tokenize import IGNORE_INDEX, EncodingError, encode_segments
from tga.errors import ConfigError
from tga.model.tokenizer import image_token_id

CONVERSATION = [
    Message("user", "What is in the picture?\n<image>"),
    Message("assistant", "A red knife lies on the left."),
    Message("user", "Is it sharp?"),
    Message("assistant", "Yes, the blade looks sharp."),
]
ALL_TEMPLATES = ["llava_llama_2", "mistral_instruct", "vicuna_v1", "plain"]


def encode(tokenizer, template, messages, **kwargs):
    max_length = kwargs.pop("max_length", None)
    segments = get_template(template).render(messages, **kwargs)
    return encode_segments(segments, tokenizer, image_token_id=image_token_id(tokenizer), num_image_tokens=576,
                           max_length=max_length)


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False).strip()


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_labels_decode_to_exactly_the_answers(mistral_tokenizer, template):
    encoded = encode(mistral_tokenizer, template, CONVERSATION, has_image=True)
    labelled = encoded.labels[encoded.labels != IGNORE_INDEX]
    assert torch.equal(labelled, encoded.input_ids[encoded.labels != IGNORE_INDEX])
    # Each contiguous run of labels is one answer (plus the end-of-turn marker the model must learn to emit).
    runs, current = [], []
    for token, label in zip(encoded.input_ids.tolist(), encoded.labels.tolist()):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    texts = [decode(mistral_tokenizer, run) for run in runs]
    answers = [CONVERSATION[1].content, CONVERSATION[3].content]
    assert [text.replace("</s>", "").strip() for text in texts] == answers
    if template == "plain":  # each caption ends with a newline, the sequence separator of stage 1
        assert all(mistral_tokenizer.decode(run[-1:]) == "\n" for run in runs)
    else:  # each answer ends with EOS so the model learns to stop
        assert all(run[-1] == mistral_tokenizer.eos_token_id for run in runs)


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_image_placeholder_expands_to_one_token_per_patch(mistral_tokenizer, template):
    encoded = encode(mistral_tokenizer, template, CONVERSATION[:2], has_image=True)
    image_positions = (encoded.input_ids == image_token_id(mistral_tokenizer)).nonzero().flatten()
    assert image_positions.numel() == 576
    assert torch.equal(image_positions, torch.arange(image_positions[0], image_positions[0] + 576))  # contiguous
    assert torch.equal(encoded.mask("image"), encoded.input_ids == image_token_id(mistral_tokenizer))
    assert (encoded.labels[encoded.mask("image")] == IGNORE_INDEX).all()


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_retrieved_and_caption_spans_select_exactly_their_text(mistral_tokenizer, template):
    retrieved = "a kitchen knife with a wooden handle"
    encoded = encode(mistral_tokenizer, template, CONVERSATION[:2], has_image=True, retrieved=retrieved)
    assert decode(mistral_tokenizer, encoded.input_ids[encoded.mask("retrieved")]) == retrieved
    # The retrieved text sits before the image, in the first user turn.
    assert encoded.mask("retrieved").nonzero().max() < encoded.mask("image").nonzero().min()
    caption = "a red knife on the left of a table"
    caption_pass = encode(mistral_tokenizer, template, [Message("user", caption)], as_caption=True,
                          add_generation_prompt=True)
    assert decode(mistral_tokenizer, caption_pass.input_ids[caption_pass.mask("caption")]) == caption
    assert not caption_pass.mask("image").any() and (caption_pass.labels == IGNORE_INDEX).all()


def test_llava_llama_2_caption_pass_keeps_the_system_prompt(mistral_tokenizer):
    caption_pass = encode(mistral_tokenizer, "llava_llama_2", [Message("user", "a cat")], as_caption=True,
                          add_generation_prompt=True)
    text = mistral_tokenizer.decode(caption_pass.input_ids)
    assert "<<SYS>>" in text and "helpful language and vision assistant" in text and text.rstrip().endswith("[/INST]")


def test_truncation_cuts_text_but_never_image_tokens(mistral_tokenizer):
    long_answer = " ".join(["word"] * 400)
    messages = [Message("user", "<image>\nDescribe."), Message("assistant", long_answer)]
    encoded = encode(mistral_tokenizer, "llava_llama_2", messages, has_image=True, max_length=700)
    assert encoded.truncated and encoded.input_ids.numel() == 700
    assert int(encoded.mask("image").sum()) == 576
    with pytest.raises(EncodingError, match="image tokens do not fit"):
        encode(mistral_tokenizer, "llava_llama_2", messages, has_image=True, max_length=300)


def test_text_only_conversation_has_no_image_tokens(mistral_tokenizer):
    messages = [Message("user", "Name a colour."), Message("assistant", "Blue.")]
    encoded = encode(mistral_tokenizer, "llava_llama_2", messages)
    assert not encoded.mask("image").any()
    assert decode(mistral_tokenizer, encoded.input_ids[encoded.labels != IGNORE_INDEX]).startswith("Blue.")


def test_bad_template_and_turn_order_are_clear_errors():
    with pytest.raises(ConfigError, match="not supported"):
        get_template("nonexistent")
    with pytest.raises(ConfigError, match="must be from the user"):
        get_template("llava_llama_2").render([Message("assistant", "hi")])
    assert get_template("v1").name == "vicuna_v1"  # LLaVA --version alias
