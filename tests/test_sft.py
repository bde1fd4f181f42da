"""SFT on TRL's data formats: `messages` conversations, `text`, and prompt/completion rows train exactly the
tokens TRL 1.16's SFTTrainer trains (its processed input ids and labels are the oracle), with and without
assistant_only_loss, on three templates shaped like real ones; packing trains as the padded layout does."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import tokenizer_zoo
import yaml
from conftest import read_metrics

from prefopt.data import load_examples
from prefopt.errors import DataError, RecipeError
from prefopt.recipe import DataConfig, DataSource

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = [
    [SYSTEM, {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."},
     {"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Because of Rayleigh scattering."}],
    [{"role": "user", "content": "Tell me a joke about cats."}, {"role": "assistant", "content": "It is blue."}],
    [SYSTEM, {"role": "user", "content": "sort: 7 2 9"}, {"role": "assistant", "content": "2 7 9"},
     {"role": "user", "content": "Summarize the text below in one sentence."},
     {"role": "assistant", "content": "It is a sunny day."}, {"role": "user", "content": "Hello world"},
     {"role": "assistant", "content": "Hello! The grass is green."}],
]
TEXTS = ["The sky is blue and the grass is green.", "Question: What is the capital of France?\nAnswer:\nParis",
         " It is blue. Why is the sky blue?"]
PLAIN_PC = [{"prompt": "Question: What is the capital of France?\nAnswer:", "completion": " Paris"},
            {"prompt": "sort: 7 2 9 =>", "completion": " 2 7 9"},
            {"prompt": "Hello world, this is", "completion": "a tokenizer for tests."}]  # merges at the boundary
CHAT_PC = [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVERSATIONS]
TEMPLATES = ["qwen25", "llama3", "phi3"]  # byte-level BPE (two), SentencePiece-style


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_tokenizers")
    return {name: getattr(tokenizer_zoo, name)(root / name) for name in TEMPLATES}


def trl_rows(tokenizer, rows, tmp_path, **args):
    """TRL 1.16 SFTTrainer's own dataset preparation: [(input_ids, trained positions)] (a position t >= 1 trains
    when its label is not -100; position 0 is never predicted)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], bf16=False, use_cpu=True, max_length=1024,
                       **args)
    completion_only = config.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in rows[0] and "completion" in rows[0]
    trainer = SimpleNamespace(_tokenizer=tokenizer, completion_only_loss=completion_only, chat_template=None)
    out = SFTTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, config, False, None, "train")
    return [(row["input_ids"], [t for t, label in enumerate(row["labels"]) if t and label != -100]) for row in out]


def prefopt_rows(tokenizer, rows, tmp_path, **data):
    """prefopt's tokenized rows, as the same [(input_ids, trained positions)]."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = DataConfig(train=[DataSource(str(path))], max_length=1024, **data)
    out = []
    for ex in load_examples(cfg.train, tokenizer, cfg, 0, "data.train", takes="any", log=lambda _: None):
        prompt, completion = ex["prompt_ids"], ex["completion_ids"]
        mask = ex.get("completion_mask") or [1] * len(completion)
        out.append((prompt + completion, [len(prompt) + j for j, m in enumerate(mask) if m and len(prompt) + j]))
    return out


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("assistant_only", [False, True])
def test_conversations_train_the_tokens_trl_trains(tokenizers, tmp_path, name, assistant_only):
    tokenizer = tokenizers[name]
    for rows in ([{"messages": c} for c in CONVERSATIONS], CHAT_PC):
        ours = prefopt_rows(tokenizer, rows, tmp_path, assistant_only_loss=assistant_only)
        theirs = trl_rows(tokenizer, rows, tmp_path, assistant_only_loss=assistant_only)
        assert ours == theirs
        trained = sum(len(positions) for _, positions in ours)
        everything = sum(len(ids) - 1 for ids, _ in ours)  # every token but the first (never predicted)
        assert trained < everything if assistant_only or "prompt" in rows[0] else trained == everything
    if assistant_only:  # the multi-turn masks have gaps: the second user turn is context between two trained turns
        ids, positions = prefopt_rows(tokenizer, [{"messages": CONVERSATIONS[0]}], tmp_path, assistant_only_loss=True)[0]
        decoded = tokenizer.decode([ids[t] for t in positions])
        assert "Paris is the capital of France." in decoded and "Rayleigh" in decoded and "sky" not in decoded


@pytest.mark.parametrize("name", ["qwen25", "phi3"])
def test_text_and_plain_prompt_completion_train_the_tokens_trl_trains(tokenizers, tmp_path, name):
    tokenizer = tokenizers[name]  # GPT-2-style (no BOS) and Llama-2-style (BOS, Metaspace prefix)
    for rows, args in (([{"text": t} for t in TEXTS], {}), (PLAIN_PC, {}),
                       (PLAIN_PC, {"completion_only_loss": False}), (CHAT_PC, {"completion_only_loss": False})):
        ours = prefopt_rows(tokenizer, rows, tmp_path, **args)
        assert ours == trl_rows(tokenizer, rows, tmp_path, **args), (rows[0], args)
        if isinstance(rows[0].get("completion", ""), str):  # plain text ends with EOS, as TRL appends it
            assert all(ids[-1] == tokenizer.eos_token_id for ids, _ in ours)


def test_sharegpt_conversations_and_tool_calls(tokenizers, tmp_path):
    """ShareGPT's {from, value} conversations; an assistant message with tool_calls (no content) and a tool's reply
    (a dataset gives every message every key, None where absent)."""
    tokenizer = tokenizers["qwen25"]
    share = [{"conversations": [{"from": m["role"].replace("user", "human").replace("assistant", "gpt"),
                                 "value": m["content"]} for m in CONVERSATIONS[0]]}]
    assert prefopt_rows(tokenizer, share, tmp_path, assistant_only_loss=True) == \
        prefopt_rows(tokenizer, [{"messages": CONVERSATIONS[0]}], tmp_path, assistant_only_loss=True)
    call = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 2, "b": 3}}}
    tools = [{"messages": [{"role": "user", "content": "What is 2 * 3?"},
                           {"role": "assistant", "tool_calls": [call]},
                           {"role": "tool", "name": "multiply", "content": "6"},
                           {"role": "assistant", "content": "It is 6."}]}]
    ours = prefopt_rows(tokenizer, tools, tmp_path, assistant_only_loss=True)
    assert ours == trl_rows(tokenizer, tools, tmp_path, assistant_only_loss=True)
    ids, positions = ours[0]
    decoded = tokenizer.decode([ids[t] for t in positions])
    assert "multiply" in decoded and "It is 6." in decoded and "<tool_response>" not in decoded


def test_prefix_diff_masks_without_generation_markers(tokenizers, tmp_path):
    """A template without {% generation %} (Qwen2.5's own): each assistant message trains what it adds after the
    generation prompt (its content and end of turn) -- the marked template's span less its leading newline, which
    the generation prompt already holds."""
    root = tmp_path / "plain"
    tokenizer = tokenizer_zoo.qwen25(root, template="qwen2_5")
    marked = tokenizers["qwen25"]
    rows = [{"messages": c} for c in CONVERSATIONS]
    for (ids, plain), (same_ids, with_markers) in zip(prefopt_rows(tokenizer, rows, tmp_path, assistant_only_loss=True),
                                                      prefopt_rows(marked, rows, tmp_path, assistant_only_loss=True)):
        assert ids == same_ids and set(plain) < set(with_markers)
        assert {tokenizer.decode([ids[t]]) for t in set(with_markers) - set(plain)} == {"\n"}
    # a template that rewrites earlier turns (drops their thinking, as Qwen3's) cannot be diffed: one error
    drops = tokenizer_zoo.ZEPHYR_TEMPLATE.replace("message['content'] + eos_token }}\n{% endif %}",
                                                  "(message['content'] if loop.last else '...') + eos_token }}\n"
                                                  "{% endif %}")
    tokenizer.chat_template = drops
    with pytest.raises(DataError, match=r"renders the conversation up to assistant message 2 differently.*"
                                        r"\{% generation %\}.*assistant_only_loss: false"):
        prefopt_rows(tokenizer, rows[:1], tmp_path, assistant_only_loss=True)


def test_sft_options_are_refused_where_they_mean_nothing(tokenizers, tmp_path, sort_task):
    with pytest.raises(DataError, match="needs conversations"):
        prefopt_rows(tokenizers["qwen25"], [{"text": t} for t in TEXTS], tmp_path, assistant_only_loss=True)
    from prefopt import recipe as recipe_lib

    path = tmp_path / "r.yaml"
    base = {"model": {"name_or_path": str(sort_task / "model")}, "data": {"train": str(sort_task / "train.jsonl"),
                                                                        "assistant_only_loss": True}}
    path.write_text(yaml.safe_dump({**base, "loss": {"name": "dpo"}}))
    with pytest.raises(RecipeError, match="data.assistant_only_loss: shapes what SFT trains"):
        recipe_lib.load(path)
    path.write_text(yaml.safe_dump({**base, "method": "sft"}))
    assert [t.name for t in recipe_lib.load(path).loss] == ["sft"] and recipe_lib.load(path).reference.kind == "none"
    path.write_text(yaml.safe_dump({**base, "method": "sft", "loss": {"name": "kto"}}))
    with pytest.raises(RecipeError, match="method 'sft' trains the likelihood"):
        recipe_lib.load(path)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tokenizers):
    from prefopt.data.synthetic import build_tiny_model

    root = tmp_path_factory.mktemp("sft_model")
    build_tiny_model(tokenizers["qwen25"], root / "model")
    rows = [{"messages": c} for c in CONVERSATIONS] * 6
    (root / "messages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in tokenizer_zoo.CORPUS[:18]))
    return root


def run_sft(root: Path, out: Path, **overrides):
    from prefopt.api import train

    recipe = {"method": "sft", "output_dir": str(out), "model": {"name_or_path": str(root / "model")},
              "data": {"train": str(root / "messages.jsonl"), "max_length": 128, "assistant_only_loss": True},
              "optim": {"lr": 3.0e-3, "schedule": "constant"},
              "train": {"batch_size": 18, "micro_batch_size": 6, "max_steps": 3, "eval_every": 0, "save_every": 0,
                        "progress_bar": False}}
    for key, value in overrides.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train(str(path))
    return [r["loss"] for r in read_metrics(out)]


def test_method_sft_trains_conversations_and_packing_equals_padding(chat_model, tokenizers, tmp_path):
    """A global batch of the whole data set: the first step's loss is the token mean of the model's own
    cross-entropy (transformers' loss) on TRL's labels, whatever the micro-batches and the layout."""
    import torch
    from transformers import AutoModelForCausalLM

    packed = run_sft(chat_model, tmp_path / "packed")
    padded = run_sft(chat_model, tmp_path / "padded", train={"packing": False})
    assert packed == pytest.approx(padded, abs=1e-5, rel=1e-5)
    assert packed[-1] < packed[0]
    model = AutoModelForCausalLM.from_pretrained(chat_model / "model")
    rows = [json.loads(line) for line in (chat_model / "messages.jsonl").read_text().splitlines()]
    total, tokens = 0.0, 0
    for ids, positions in trl_rows(tokenizers["qwen25"], rows, tmp_path, assistant_only_loss=True):
        labels = torch.full((1, len(ids)), -100)
        labels[0, positions] = torch.tensor(ids)[positions]
        with torch.no_grad():
            total += model(input_ids=torch.tensor([ids]), labels=labels).loss.item() * len(positions)
        tokens += len(positions)
    assert packed[0] == pytest.approx(total / tokens, rel=1e-5)


def test_text_documents_pack_with_attention_inside_each(chat_model, tmp_path):
    """`text` rows: documents end to end in a row, position ids restarting at each (so attention stays inside
    it): the same losses as one padded document per row."""
    from prefopt.evaluation import evaluate_run

    data = {"train": str(chat_model / "text.jsonl"), "assistant_only_loss": False}
    packed = run_sft(chat_model, tmp_path / "packed", data=data)
    assert packed == pytest.approx(run_sft(chat_model, tmp_path / "padded", data=data, train={"packing": False}),
                                   abs=1e-5, rel=1e-5)
    report = evaluate_run(tmp_path / "packed", str(chat_model / "text.jsonl"))  # prefopt eval on an SFT run
    assert report["pairs"] == 18 and 0 < report["loss"] < packed[0]


def test_inspect_shows_the_untrained_turns(chat_model, tmp_path):
    from prefopt.preview import inspect_recipe

    run_recipe = tmp_path / "r.yaml"
    run_recipe.write_text(yaml.safe_dump({"method": "sft", "model": {"name_or_path": str(chat_model / "model")},
                                          "data": {"train": str(chat_model / "messages.jsonl"),
                                                   "assistant_only_loss": True}}))
    shown = inspect_recipe(str(run_recipe), rows=1)
    assert "trained, ⟦untrained⟧" in shown and "⟦<|im_start|>⟧" in shown and "|Paris|" not in shown.split("‖")[0]
