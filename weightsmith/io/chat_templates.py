"""Chat templates a recipe can name (``chat_template: chatml``), written from the public prompt
formats, and how a recipe's ``chat_template`` value becomes the text stored in the output's
``tokenizer_config.json``."""

from __future__ import annotations

import json
from pathlib import Path

from weightsmith.errors import RecipeError

_ALPACA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_MISTRAL = (
    "{{ bos_token }}{% set system = namespace(text='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + system.text + message['content'] + ' [/INST]' }}"
    "{% set system.text = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
_EXAONE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)
NAMED_TEMPLATES = {
    "alpaca": _ALPACA,
    "chatml": _CHATML,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
    "exaone": _EXAONE,
}
# Files in which transformers keeps a chat template outside tokenizer_config.json; they win over
# it when a tokenizer loads, so a recipe's template replaces them.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def resolve_chat_template(value: str | None) -> str | None:
    """The template text a recipe's ``chat_template`` asks for; None for ``auto`` or unset
    (the tokenizer source's template is kept, as its files are copied)."""
    if value is None or value == "auto":
        return None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        names = ", ".join(NAMED_TEMPLATES)
        raise RecipeError(
            f"chat_template: {value!r} is neither a known template ({names}, auto) nor Jinja text"
        )
    return value


def write_chat_template(folder: Path, template: str) -> None:
    """Store ``template`` in ``folder``'s tokenizer_config.json (and drop template files that
    would take precedence over it)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for name in TEMPLATE_FILES:
        (folder / name).unlink(missing_ok=True)
