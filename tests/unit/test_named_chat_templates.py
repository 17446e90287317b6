"""Named chat templates (chatml, llama3, mistral) render the exact text of their family, with only the
assistant's turns trained; an unknown name is refused at plan time with the list (it used to be taken as a
Jinja template that renders as itself, and every row was dropped on the ranks)."""

import pytest

from dist_ft.plan.plan import make_plan
from dist_ft.rank.data import IGNORE_INDEX, sft_example
from dist_ft.rank.tokenizer import byte_tokenizer
from dist_ft.recipe.config import apply_overrides, recipe_from_dict
from dist_ft.recipe.model_shape import shape_from_config
from dist_ft.recipe.strict import RecipeError
from tests.conftest import demo_raw

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
EXPECTED = {  # (the whole text, the trained parts)
    "chatml": ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
               "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao<|im_end|>\n",
               ["Hello<|im_end|>\n", "Ciao<|im_end|>\n"]),
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nCiao<|eot_id|>",
               ["Hello<|eot_id|>", "Ciao<|eot_id|>"]),
    "mistral": ("<s>[INST] Hi [/INST] Hello</s>[INST] Bye [/INST] Ciao</s>", [" Hello</s>", " Ciao</s>"]),
}


def chat_plan(template: str):
    raw = apply_overrides(demo_raw(), ["finetune.format=chat", f"finetune.template={template}"])
    recipe = recipe_from_dict(raw)
    return make_plan(recipe, shape_from_config(recipe.model.config, "test"), "/tmp/run")


def trained_spans(ids: list[int], labels: list[int], tok) -> list[str]:
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans, current = spans + [tok.decode(current)], []
    return spans + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_named_chat_template_renders_its_familys_text_and_trains_the_assistant_turns(name):
    tok = byte_tokenizer()
    template = chat_plan(name).stage("sft").template  # what the ranks get: the Jinja text
    example = sft_example(CHAT, tok, "chat", template, 4096)
    text, trained = EXPECTED[name]
    assert tok.decode(example["input_ids"]) == text
    assert trained_spans(example["input_ids"], example["labels"], tok) == trained


def test_an_unknown_template_name_for_chat_rows_is_refused_with_the_list():
    with pytest.raises(RecipeError) as err:
        chat_plan("vicuna")
    problem = err.value.problems[0]
    assert problem.path == "finetune.template"
    assert problem.what.startswith("'vicuna' is neither a named chat template nor a Jinja template")
    assert problem.fix == "use one of chatml, llama3, mistral, chat_template (the tokenizer's), or a Jinja chat template"


def test_a_chat_template_name_on_instruction_rows_says_how_to_use_it():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(apply_overrides(demo_raw(), ["finetune.template=llama3"]))
    assert "'llama3' is a chat template" in str(err.value) and "format: chat" in str(err.value)


def test_a_jinja_template_and_the_tokenizers_still_pass_through():
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_plan(f'"{jinja}"').stage("sft").template == jinja
    assert chat_plan("chat_template").stage("sft").template == "chat_template"
