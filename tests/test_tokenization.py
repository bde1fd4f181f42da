"""Tokens are what inference sees, for tokenizers shaped like real ones (tests/tokenizer_zoo.py): prompt ids are
the prompt's own, completion ids continue them as the joint tokenization does, and both equal TRL 1.16's
(DPOTrainer for pairs, KTOTrainer for unpaired rows) on the same rows."""

import json
from types import SimpleNamespace

import pytest
import tokenizer_zoo

from prefopt.data import load_examples
from prefopt.recipe import DataConfig, DataSource

STANDARD = [
    {"prompt": "Question: What is the capital of France?\nAnswer:\n", "chosen": "Paris", "rejected": "Lyon"},
    {"prompt": "Tell me a joke about cats.", "chosen": "\nWhy is the sky blue?", "rejected": "\nIt is green."},
    {"prompt": "The sky is ", "chosen": "blue.", "rejected": "green."},  # ends with a space: merges
    {"prompt": "Hello wor", "chosen": "ld, this is a test.", "rejected": "ld is green."},  # mid-word: merges
    {"prompt": "sort: 7 2 9 =>", "chosen": " 2 7 9", "rejected": " 9 2 7"},
    {"prompt": "Why is the sky blue?", "chosen": " Because of Rayleigh scattering.", "rejected": " It is."},
    {"prompt": "Summarize the text below in one sentence.\n", "chosen": "A sunny day.", "rejected": "Cats."},
    {"prompt": "What color is the grass?", "chosen": " It is green.", "rejected": " It is blue."},
    {"prompt": "You are a helpful assistant. Hello", "chosen": " world!", "rejected": "!"},
    {"prompt": "", "chosen": "Hello world", "rejected": "Hello cats"},  # no prompt at all
    {"prompt": "Answer:", "chosen": "Paris</s>", "rejected": " Lyon<|endoftext|>"},  # EOS text already there
]
QUESTIONS = ["What color is the sky?", "Tell me a joke about cats.", "What is the capital of France?",
             "Why is the sky blue?", "Hello world", "sort: 7 2 9 =>", "Summarize: a sunny day.",
             "Is the grass green?", "Answer briefly: 2 + 2?", "Say hello.", "Name a color."]
CONVERSATIONAL = [
    {"prompt": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": q}]
     if i % 3 == 0 else [{"role": "user", "content": q}],
     "chosen": [{"role": "assistant", "content": "It is blue." if i % 2 else "\nParis"}],
     "rejected": [{"role": "assistant", "content": "It is green."}]} for i, q in enumerate(QUESTIONS)]
IMPLICIT_TEXT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in STANDARD]
IMPLICIT_CHAT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                 for r in CONVERSATIONAL]
UNPAIRED = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
            for r in STANDARD[:6] for key in ("chosen", "rejected")]
UNPAIRED_CHAT = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in CONVERSATIONAL]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {name: getattr(tokenizer_zoo, name)(root / name) for name in ("llama2", "gpt2", "zephyr")}


def prefopt_ids(tokenizer, rows, tmp_path, **cfg):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig(train=[], **cfg)
    return load_examples([DataSource(str(path))], tokenizer, config, 0, "data.train", takes="any",
                         log=lambda _: None)


def trl_ids(tokenizer, rows, unpaired=False):
    from datasets import Dataset
    from trl import DPOTrainer, KTOTrainer

    trainer = KTOTrainer if unpaired else DPOTrainer
    stub = SimpleNamespace(_tokenizer=tokenizer, calculate_KL=False, desirable_weight=1.0, undesirable_weight=1.0)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    dataset = trainer._prepare_dataset(stub, Dataset.from_list(rows), tokenizer, args, "train")
    keys = ("prompt_ids", "completion_ids") if unpaired else ("prompt_ids", "chosen_ids", "rejected_ids")
    return [{k: row[k] for k in keys} for row in dataset]


def joint(tokenizer, text_or_messages, prompt=None):
    """What inference tokenizes: the plain text with the tokenizer's special tokens, or the rendered chat."""
    if isinstance(text_or_messages, list):
        return tokenizer.apply_chat_template(text_or_messages, tokenize=True, return_dict=True,
                                             add_generation_prompt=prompt is not None)["input_ids"]
    return tokenizer(text_or_messages)["input_ids"]


CASES = [("llama2", STANDARD, False), ("gpt2", STANDARD, False), ("zephyr", STANDARD, False),
         ("gpt2", CONVERSATIONAL, False), ("zephyr", CONVERSATIONAL, False),
         ("llama2", IMPLICIT_TEXT, False), ("gpt2", IMPLICIT_TEXT, False), ("gpt2", IMPLICIT_CHAT, False),
         ("zephyr", IMPLICIT_CHAT, False),
         ("llama2", UNPAIRED, True), ("gpt2", UNPAIRED, True), ("zephyr", UNPAIRED_CHAT, True)]


@pytest.mark.parametrize("name,rows,unpaired", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_ids_equal_trl_and_inference(zoo, tmp_path, name, rows, unpaired):
    tokenizer = zoo[name]
    ours = prefopt_ids(tokenizer, rows, tmp_path)
    theirs = trl_ids(tokenizer, rows, unpaired)
    assert len(ours) == len(theirs) == len(rows) >= 5
    for mine, trl in zip(ours, theirs):
        assert {k: mine[k] for k in trl} == trl
    for mine in ours:  # every sequence is a prefix-exact continuation of the prompt's own tokens
        for key in ("chosen_ids", "rejected_ids", "completion_ids"):
            if key in mine:
                assert tokenizer.decode(mine["prompt_ids"] + mine[key]).startswith(
                    tokenizer.decode(mine["prompt_ids"]))


def test_the_three_audit_cases_for_llama2_style_tokenizers(zoo, tmp_path):
    """'Paris' after 'Answer:\\n' is 'Par','is' (not '▁Paris'); a completion starting with '\\n' gains no '▁';
    a Zephyr chat reply starts 'It', not '▁It'; a plain prompt keeps its BOS."""
    llama, zephyr = zoo["llama2"], zoo["zephyr"]
    paris, newline = prefopt_ids(llama, STANDARD[:2], tmp_path)
    assert paris["prompt_ids"][0] == llama.bos_token_id
    assert llama.convert_ids_to_tokens(paris["chosen_ids"]) == llama.convert_ids_to_tokens(
        joint(llama, STANDARD[0]["prompt"] + "Paris")[len(paris["prompt_ids"]):]) + ["</s>"]
    assert "▁" not in "".join(llama.convert_ids_to_tokens(paris["chosen_ids"]))
    alone = llama("Paris", add_special_tokens=False)["input_ids"]
    assert paris["chosen_ids"][:-1] != alone  # what separate tokenization trained on
    assert llama.convert_ids_to_tokens(newline["chosen_ids"])[0] == "<0x0A>"
    (chat,) = prefopt_ids(zephyr, CONVERSATIONAL[1:2], tmp_path)
    assert zephyr.convert_ids_to_tokens(chat["chosen_ids"])[0] == "It"
    full = joint(zephyr, CONVERSATIONAL[1]["prompt"] + CONVERSATIONAL[1]["chosen"])
    assert chat["prompt_ids"] + chat["chosen_ids"] == full


def test_boundary_merges_follow_the_documented_rule(zoo, tmp_path):
    """A prompt ending mid-word keeps its tokens up to where the joint tokenization diverges; the completion
    is the joint tokens from there (the merged token is scored), so the text is exact."""
    llama = zoo["llama2"]
    (row,) = prefopt_ids(llama, STANDARD[3:4], tmp_path)
    own = llama("Hello wor")["input_ids"]
    assert row["prompt_ids"] == own[: len(row["prompt_ids"])] and len(row["prompt_ids"]) < len(own)
    assert row["prompt_ids"] + row["chosen_ids"] == joint(llama, "Hello world, this is a test.") + [llama.eos_token_id]


@pytest.mark.parametrize("truncation", ["keep_start", "keep_end"])
def test_truncation_keeps_the_bos_and_fits(zoo, tmp_path, truncation):
    llama = zoo["llama2"]
    long = {"prompt": "Question: " + "What is the capital of France? " * 8 + "\nAnswer:\n",
            "chosen": "Paris is the capital of France. " * 3, "rejected": "Lyon"}
    limit = 40 if truncation == "keep_end" else 70  # the prompt alone is 55 tokens
    rows = prefopt_ids(llama, [long, STANDARD[0]], tmp_path, max_length=limit, truncation=truncation)
    for row in rows:
        assert row["prompt_ids"][0] == llama.bos_token_id
        assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= limit
    whole_prompt = llama(long["prompt"])["input_ids"]
    if truncation == "keep_end":  # the prompt was cut (head kept, end kept), the whole completion fits
        assert rows[0]["chosen_ids"][-1] == llama.eos_token_id
        assert rows[0]["prompt_ids"][-3:] == whole_prompt[-3:] and len(rows[0]["prompt_ids"]) < len(whole_prompt)
    else:  # the prompt whole, the completion cut at its end
        assert rows[0]["prompt_ids"] == whole_prompt and rows[0]["chosen_ids"][-1] != llama.eos_token_id
    (capped,) = prefopt_ids(llama, [long], tmp_path, max_length=200, max_prompt_length=10)
    assert len(capped["prompt_ids"]) == 10 and capped["prompt_ids"][0] == llama.bos_token_id


def test_a_prompt_that_fills_max_length_is_reported(zoo, tmp_path):
    from prefopt.errors import DataError

    long = {"prompt": "What is the capital of France? " * 10, "chosen": "Paris", "rejected": "Lyon"}
    with pytest.raises(DataError, match=r"row 0: its prompt is \d+ tokens, leaving no room .*truncation: keep_end"):
        prefopt_ids(zoo["llama2"], [long, STANDARD[0]], tmp_path, max_length=20)
    assert len(prefopt_ids(zoo["llama2"], [long, STANDARD[0]], tmp_path, max_length=20, on_bad_row="drop")) == 1


def test_default_keeps_prompts_whole_like_trl(zoo, tmp_path):
    """Only max_length applies by default (1024): a 300-token prompt is not cut."""
    prompt = "Tell me a joke about cats. " * 40
    (row,) = prefopt_ids(zoo["gpt2"], [{"prompt": prompt, "chosen": " No.", "rejected": " Yes."}], tmp_path)
    assert row["prompt_ids"] == zoo["gpt2"](prompt)["input_ids"] and len(row["prompt_ids"]) > 256


def test_inspect_marks_the_boundary(zoo, sort_task, tmp_path, capsys):
    """`prefopt inspect` on the quickstart-shaped recipe and on a conversational one (Zephyr template)."""
    from conftest import write_recipe

    from prefopt.cli import main

    assert main(["inspect", str(write_recipe(tmp_path / "q.yaml", sort_task, tmp_path / "q")), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    first = json.loads((sort_task / "train.jsonl").read_text().splitlines()[0])
    tokenizer = zoo["gpt2"].from_pretrained(sort_task / "model")
    prompt = tokenizer.convert_ids_to_tokens(tokenizer(first["prompt"])["input_ids"])
    chosen = tokenizer.convert_ids_to_tokens(tokenizer(first["prompt"] + first["chosen"])["input_ids"])[len(prompt):]
    assert f"chosen ({len(chosen) + 1} tokens): {'|'.join(prompt)} ‖ {'|'.join(chosen)}|<|endoftext|>" in out
    assert "data.eval example 0" in out and "truncated" in out
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONAL))
    recipe = write_recipe(tmp_path / "c.yaml", sort_task, tmp_path / "c", data={"train": str(chat), "eval": None},
                          model={"name_or_path": zoo["zephyr"].name_or_path})
    assert main(["inspect", str(recipe), "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "|<0x0A> ‖ It|▁is|▁blue.|</s>|<0x0A>" in out  # "It", not "▁It"; the turn ends as the template ends it


@pytest.mark.parametrize("name,rows,unpaired", [CASES[0], CASES[3], CASES[8], CASES[10]],
                         ids=["llama2-text", "gpt2-chat", "zephyr-implicit-chat", "gpt2-unpaired"])
def test_streamed_ids_equal_trl(zoo, tmp_path, name, rows, unpaired):
    """data.streaming tokenizes in its background thread through the same code: the same ids as TRL's, in the
    stream's own order."""
    from prefopt.data.stream import Stream

    tokenizer = zoo[name]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=[DataSource(str(path))], streaming=True, shuffle_buffer=4)
    source = Stream(cfg.train, tokenizer, cfg, 0, "data.train", "any", log=lambda _: None)
    streamed = source.take(len(rows))
    source.close()
    keys = ("prompt_ids", "completion_ids") if unpaired else ("prompt_ids", "chosen_ids", "rejected_ids")
    assert sorted(tuple(tuple(r[k]) for k in keys) for r in streamed) == \
        sorted(tuple(tuple(r[k]) for k in keys) for r in trl_ids(tokenizer, rows, unpaired))
