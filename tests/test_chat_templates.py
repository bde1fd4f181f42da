"""Chat templates under the user's control: model.chat_template replaces the tokenizer's, data.chat_template_kwargs
reach every render, and a tokenizer without a template meets conversational data with one error."""

import json

import pytest
import tokenizer_zoo
import yaml

from prefopt import recipe as recipe_lib
from prefopt.errors import DataError, RecipeError
from prefopt.preview import inspect_recipe


def rendered(path, overrides=()) -> str:
    """The first training row's prompt as the run tokenizes it, decoded (the same render as training, rollouts
    and evaluation: prefopt.data.formats.render_chat)."""
    from prefopt.data import load_examples, load_prompts
    from prefopt.methods import METHODS
    from prefopt.models import load_tokenizer

    r = recipe_lib.load(path, overrides)
    tokenizer = load_tokenizer(r.model, r.data.chat_template_kwargs)
    if METHODS[r.method].prompts_only:
        rows = load_prompts(r.data.train, tokenizer, r.data, 0, "data.train", log=lambda _: None)
    else:
        rows = load_examples(r.data.train, tokenizer, r.data, 0, "data.train", takes="any", log=lambda _: None)
    return tokenizer.decode(rows[0]["prompt_ids"])

THINKING = tokenizer_zoo.ZEPHYR_TEMPLATE.replace(  # Qwen3-style: a switch the template reads from its kwargs
    "'<|user|>\n' + message['content']",
    "'<|user|>\n' + message['content'] + (' /no_think' if enable_thinking is defined and not enable_thinking else '')")


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    """A Llama-2-style tokenizer with no chat template, and conversational pairs and prompts."""
    root = tmp_path_factory.mktemp("templates")
    tokenizer_zoo.llama2(root / "tok")
    user = [{"role": "user", "content": "Tell me a joke about cats."}]
    pair = {"prompt": user, "chosen": [{"role": "assistant", "content": "It is blue."}],
            "rejected": [{"role": "assistant", "content": "It is green."}]}
    (root / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    (root / "prompts.jsonl").write_text(json.dumps({"prompt": user}) + "\n")
    return root


def recipe(root, tmp_path, data="pairs.jsonl", **model):
    sections = {"model": {"name_or_path": str(root / "tok"), **model},
                "data": {"train": str(root / data), "max_length": 128}}
    if data == "prompts.jsonl":
        sections.update(method="rl", rewards={"function": "prefopt.data.synthetic:sort_scores"})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def test_no_template_with_conversations_is_one_error_naming_both_fixes(plain_tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"tokenizer of .*tok' has no chat template\. Give one with model.chat_template"
                                        r".*or give plain-text"):
        inspect_recipe(recipe(plain_tokenizer, tmp_path))


@pytest.mark.parametrize("data", ["pairs.jsonl", "prompts.jsonl"])
def test_model_chat_template_as_a_string_or_a_file(plain_tokenizer, tmp_path, data):
    shown = rendered(recipe(plain_tokenizer, tmp_path, data, chat_template=tokenizer_zoo.ZEPHYR_TEMPLATE))
    assert shown.startswith("<|user|>\nTell me a joke about cats.</s>") and "<|assistant|>" in shown
    (tmp_path / "t.jinja").write_text(tokenizer_zoo.ZEPHYR_TEMPLATE)
    assert rendered(recipe(plain_tokenizer, tmp_path, data, chat_template=str(tmp_path / "t.jinja"))) == shown
    assert "<|user|>" in inspect_recipe(recipe(plain_tokenizer, tmp_path, data, chat_template=str(tmp_path / "t.jinja")))
    with pytest.raises(RecipeError, match="model.chat_template: no such file"):
        rendered(recipe(plain_tokenizer, tmp_path, data, chat_template=str(tmp_path / "missing.jinja")))


@pytest.mark.parametrize("data", ["pairs.jsonl", "prompts.jsonl"])
def test_chat_template_kwargs_reach_the_render(plain_tokenizer, tmp_path, data):
    path = recipe(plain_tokenizer, tmp_path, data, chat_template=THINKING)
    assert "/no_think" not in rendered(path)
    assert "cats. /no_think</s>" in rendered(path, ["data.chat_template_kwargs={enable_thinking: false}"])


def test_a_run_on_conversations_gets_a_card_snippet_through_the_chat_template(plain_tokenizer, tmp_path):
    import re

    from prefopt.cli import train_recipe
    from prefopt.data.synthetic import build_tiny_model

    model = build_tiny_model(__import__("transformers").AutoTokenizer.from_pretrained(plain_tokenizer / "tok"),
                             tmp_path / "model")
    sections = {"output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model),
                                                               "chat_template": tokenizer_zoo.ZEPHYR_TEMPLATE},
                "data": {"train": str(plain_tokenizer / "pairs.jsonl"), "max_length": 128},
                "loss": {"name": "dpo"}, "train": {"batch_size": 1, "micro_batch_size": 1, "max_steps": 1,
                                                   "progress_bar": False}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(sections))
    train_recipe(path)
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "apply_chat_template(messages, add_generation_prompt=True" in snippet
    namespace = {}
    exec(snippet, namespace)  # transformers alone: the saved tokenizer carries the template the run used
    assert namespace["tokenizer"].chat_template == tokenizer_zoo.ZEPHYR_TEMPLATE
