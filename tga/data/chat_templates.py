"""tga/data/chat_templates.py

Jinja chat templates equivalent to the project's conversation templates, saved into every model folder (tokenizer
and processor), so that `apply_chat_template` in plain transformers, vLLM and lmms-eval (`llava_hf`) format prompts
exactly as training did. Messages may hold a string (with an optional `<image>` placeholder) or HF's content list
(`{"type": "image"}`, `{"type": "text", "text": ...}`); as in training, the image goes first in its turn.
tests/test_chat_templates.py checks each one against `PromptTemplate.render` character by character.
"""

from __future__ import annotations

from dataclasses import dataclass

from tga.data.templates import get_template

_MACROS = r"""
{%- macro text_of(message) -%}
{%- if message['content'] is string -%}{{ message['content'] }}
{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro has_image(message) -%}
{%- if message['content'] is string -%}{{ '<image>' in message['content'] }}
{%- else -%}{{ message['content'] | selectattr('type', 'equalto', 'image') | list | length > 0 }}
{%- endif -%}
{%- endmacro -%}
{%- macro user_turn(message, keep_question) -%}
{%- set text = text_of(message) | replace('<image>', '') -%}
{%- if has_image(message) == 'True' -%}{{ '<image>' }}{%- if keep_question and text | trim -%}{{ '\n' + text | trim }}{%- endif -%}
{%- else -%}{{ text_of(message) }}{%- endif -%}
{%- endmacro -%}
"""


@dataclass(frozen=True)
class ChatFormat:
    """The strings around user turns and answers (what `PromptTemplate.turn` emits)."""

    first_open: str  # before the first user turn; may use `system` (a Jinja expression string)
    next_open: str  # before later user turns
    user_close: str  # after each user turn (the assistant prefix)
    answer_open: str
    answer_close: str
    keep_question: bool = True  # `plain` drops the question of an image turn


FORMATS = {
    "plain": ChatFormat("''", "''", "", "", "\n", keep_question=False),
    "llava_llama_2": ChatFormat("'[INST] ' + ('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' if system else '')",
                                "'<s>[INST] '", " [/INST]", " ", " </s>"),
    "mistral_instruct": ChatFormat("'[INST] ' + (system + '\\n\\n' if system else '')", "'[INST] '", " [/INST]", " ",
                                   "</s>"),
    "vicuna_v1": ChatFormat("(system + ' ' if system else '') + 'USER: '", "'USER: '", " ASSISTANT:", " ", "</s>"),
    "chatml": ChatFormat("('<|im_start|>system\\n' + system + '<|im_end|>\\n' if system else '') + '<|im_start|>user\\n'",
                         "'<|im_start|>user\\n'", "<|im_end|>\n<|im_start|>assistant\n", "", "<|im_end|>\n"),
}


def jinja_literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template(name: str) -> str:
    """The Jinja chat template of the conversation template `name`."""
    template = get_template(name)
    fmt = FORMATS[template.name]
    return _MACROS + (
        "{%- set system = " + jinja_literal(template.default_system) + " -%}"
        "{%- set turns = messages -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = text_of(messages[0]) -%}{%- set turns = messages[1:] -%}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ (" + fmt.first_open + ") if loop.first else (" + fmt.next_open + ") }}"
        "{{ user_turn(message, " + str(fmt.keep_question).lower() + ") }}{{ " + jinja_literal(fmt.user_close) + " }}"
        "{%- else -%}"
        "{{ " + jinja_literal(fmt.answer_open) + " + text_of(message) | trim + " + jinja_literal(fmt.answer_close) + " }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
