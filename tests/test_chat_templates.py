"""The saved Jinja chat templates render exactly what training renders, for every template."""

import pytest

from tga.data.chat_templates import chat_template
from tga.data.templates import Message, get_template

CASES = [
    ([Message("user", "Name a colour.")], False, None),
    ([Message("user", "<image>\nWhat is this?")], True, None),
    ([Message("user", "What is this? <image>")], True, None),
    ([Message("user", "<image>\nWhat is this?"), Message("assistant", " A red cup. "), Message("user", "Sure?")],
     True, None),
    ([Message("user", "<image>\nDescribe it."), Message("assistant", "A knife.")], True, "Be brief."),
]


def expected(name, messages, has_image, system):
    segments = get_template(name).render(messages, has_image=has_image, system=system)
    return "".join(segment.text for segment in segments)


@pytest.mark.parametrize("name", ["plain", "llava_llama_2", "mistral_instruct", "vicuna_v1", "chatml"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_jinja_matches_training_render(mistral_tokenizer, name, case):
    messages, has_image, system = CASES[case]
    hf_messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m.role, "content": m.content} for m in messages]
    rendered = mistral_tokenizer.apply_chat_template(hf_messages, chat_template=chat_template(name), tokenize=False)
    assert rendered == expected(name, messages, has_image, system)


@pytest.mark.parametrize("name", ["llava_llama_2", "mistral_instruct"])
def test_content_list_format_with_image_part(mistral_tokenizer, name):
    hf_messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]}]
    rendered = mistral_tokenizer.apply_chat_template(hf_messages, chat_template=chat_template(name), tokenize=False)
    assert rendered == expected(name, [Message("user", "<image>\nWhat is this?")], True, None)
