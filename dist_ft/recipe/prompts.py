"""Prompt templates for instruction rows, by name or as a format string. Pure: the recipe checks a
template here at plan time, and the data path renders rows with the same functions.

`finetune.template` means, by `finetune.format`:
- instruction: unset → the tokenizer's chat template when it has one, else Alpaca; `alpaca` → the
  Alpaca prompt (its with-input or no-input form, by row); `chat_template` → the tokenizer's chat
  template; anything else → a str.format prompt with {instruction} and optionally {input}.
- chat: unset or `chat_template` → the tokenizer's chat template; `chatml`, `llama3`, `mistral` → that
  family's chat template (the plan writes its Jinja into plan.json); anything else must be a Jinja chat
  template ({{ or {%) that replaces the tokenizer's: a bare word would render as itself and every row be
  dropped on the ranks.
- text: no template (the text is the whole example).
"""

from __future__ import annotations

import string

ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")
NAMED_PROMPTS = {"alpaca": (ALPACA, ALPACA_NO_INPUT)}  # name → (with input, without input)
CHAT_TEMPLATE = "chat_template"  # the tokenizer's own chat template
# Named chat templates (the LLaMA-Factory habit). Each renders a conversation as the concatenation of its
# turns, so a prefix of the conversation renders as a prefix of the text (what the label mask relies on).
NAMED_CHAT_TEMPLATES = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
               "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "mistral": ("{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                "' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + '</s>' }}"
                "{% else %}{{ m['content'] + '\n\n' }}{% endif %}{% endfor %}"),
}
FIELDS = ("instruction", "input")
MAX_TEMPLATE_CHARS = 100_000


def template_problem(fmt: str, template: str | None) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) with `template` for rows of format `fmt`, or None."""
    if template is None:
        return None
    if len(template) > MAX_TEMPLATE_CHARS:
        return f"{len(template)} characters is more than {MAX_TEMPLATE_CHARS}", "shorten the template"
    if fmt == "text":
        return "text rows take no template (the text is the whole example)", "remove finetune.template"
    chat_names = ", ".join([*NAMED_CHAT_TEMPLATES, CHAT_TEMPLATE])
    if fmt == "chat":
        if template in NAMED_PROMPTS:
            return (f"{template!r} is an instruction-row prompt, not a chat template",
                    f"use format: instruction, or template: one of {chat_names} (the tokenizer's), or a Jinja "
                    "template")
        if template in NAMED_CHAT_TEMPLATES or template == CHAT_TEMPLATE or "{{" in template or "{%" in template:
            return None
        return (f"{template[:60]!r} is neither a named chat template nor a Jinja template (it would render as "
                "itself and every row be dropped)", f"use one of {chat_names} (the tokenizer's), or a Jinja "
                "chat template")
    if template in NAMED_PROMPTS or template == CHAT_TEMPLATE:
        return None
    if template in NAMED_CHAT_TEMPLATES:
        return (f"{template!r} is a chat template: instruction rows go through a chat template only as "
                f"`{CHAT_TEMPLATE}` (the tokenizer's)", f"use `format: chat` with messages rows, or template: "
                f"{CHAT_TEMPLATE} or alpaca")
    return _format_string_problem(template)


def stage_template(fmt: str, template: str | None) -> str | None:
    """The template a stage's ranks render with: a named chat template becomes its Jinja text."""
    return NAMED_CHAT_TEMPLATES[template] if fmt == "chat" and template in NAMED_CHAT_TEMPLATES else template


def _format_string_problem(template: str) -> tuple[str, str] | None:
    names = sorted(NAMED_PROMPTS) + [CHAT_TEMPLATE]
    fix = (f"use one of {', '.join(names)}, or a format string with {{instruction}} (and {{input}}); "
           "write literal braces as {{ and }}")
    try:
        fields = _fields(template)
    except ValueError as err:
        return f"{template[:60]!r} is not a valid format string ({err})", fix
    unknown = sorted({field for field in fields if field not in FIELDS})
    if unknown:
        return f"{template[:60]!r} has unknown placeholders {unknown} (only {{instruction}} and {{input}})", fix
    if "instruction" not in fields:
        return f"{template[:60]!r} is neither a template name nor a format string with {{instruction}}", fix
    return None


def _fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def uses_chat_template(template: str | None, tokenizer_has_one: bool) -> bool:
    """Whether instruction rows go through the (tokenizer's) chat template."""
    return template == CHAT_TEMPLATE or (template is None and tokenizer_has_one)


def instruction_prompt(template: str | None, instruction: str, extra: str) -> str:
    """The prompt text for an instruction row (not the chat-template path); `extra` is its input."""
    with_input, without_input = NAMED_PROMPTS.get(template or "alpaca", (template, template))
    return (with_input if extra else without_input).format(instruction=instruction, input=extra)


def drops_input(template: str | None) -> bool:
    """A custom format string without {input}: a row's input would not reach the model."""
    return template not in (None, CHAT_TEMPLATE, *NAMED_PROMPTS) and "input" not in _fields(template)


def chat_template(eos_token: str) -> str:
    """A minimal Jinja chat template; each turn ends with `eos_token` so the model learns to stop.

    Role markers such as <|user|> are plain text, not special tokens.
    """
    return ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + eos_token + "\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
