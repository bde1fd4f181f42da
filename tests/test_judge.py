"""LLM-judge reward terms: a tiny causal LM as the judge, its greedy verdicts parsed into scores; a verdict the
parser cannot read scores None and is counted, and training goes on."""

import pytest
import torch
from conftest import read_metrics, write_recipe
from test_ppo import ppo_sections

from prefopt.cli import train_recipe
from prefopt.errors import PrefoptError, RecipeError
from prefopt.recipe_online import JudgeConfig, RewardTerm
from prefopt.rewards import RewardTerms

TEMPLATE = "Rate the answer to {prompt} from 0 to 9. Answer: {completion} Expected: {answer} Score:"


def verdict_length(verdict):
    """A parser of the test's: the verdict's length mod 10 (the tiny judge writes noise; this reads it all)."""
    return len(verdict) % 10


def test_a_judge_scores_as_its_parser_reads_its_greedy_verdicts(sort_task):
    """The term's scores against the judge's verdicts generated apart (plain HF greedy generate on the same
    prompts): equal; a regex that never matches scores None everywhere, counted as unparsed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    judge = JudgeConfig(model=str(sort_task / "model"), template=TEMPLATE, parse="test_judge:verdict_length",
                        max_new_tokens=6)
    terms = RewardTerms([RewardTerm(judge=judge)])
    prompts, completions = ["sort: 3 1 =>", "sort: 2 5 4 =>"], [" 1 3", " 2 4"]
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, [" 1 3", " 2 4 5"])]
    scores = terms(prompts, completions, rows)
    tokenizer = AutoTokenizer.from_pretrained(sort_task / "model")
    model = AutoModelForCausalLM.from_pretrained(sort_task / "model").eval()
    expected = []
    for prompt, completion, row in zip(prompts, completions, rows):
        ids = torch.tensor([tokenizer(TEMPLATE.format(prompt=prompt, completion=completion,
                                                      answer=row["answer"]))["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        new = new[: new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new
        expected.append(float(len(tokenizer.decode(new, skip_special_tokens=True)) % 10))
    assert scores.total.tolist() == expected and scores.metrics["rewards/judge/unparsed"] == 0.0

    never = RewardTerms([RewardTerm(judge=JudgeConfig(model=str(sort_task / "model"), template=TEMPLATE,
                                                      parse=r"VERDICT=(\d)", max_new_tokens=4))])
    scored = never(prompts, completions, rows)
    assert torch.isnan(scored.terms).all() and scored.metrics["rewards/judge/unparsed"] == 1.0


def test_a_run_with_a_judge_term_counts_its_malformed_verdicts(sort_task, tmp_path):
    sections = ppo_sections(advantage="grpo", num_mini_batches=1)
    sections["rewards"] = [{"function": "test_ppo:length_score"},
                           {"judge": {"model": str(sort_task / "model"), "template": "{prompt}{completion}",
                                      "parse": r"(\d+)", "max_new_tokens": 4}}]
    sections["train"] = {**sections["train"], "max_steps": 2}
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))
    records = read_metrics(tmp_path / "run")
    assert all(0.0 <= r["rewards/judge/unparsed"] <= 1.0 for r in records) and len(records) == 2


def test_judge_errors(sort_task, tmp_path):
    with pytest.raises(RecipeError, match="must show the completion"):
        RewardTerms([RewardTerm(judge=JudgeConfig(model=str(sort_task / "model"), template="{prompt}"))])
    with pytest.raises(RecipeError, match="must have one group"):
        RewardTerms([RewardTerm(judge=JudgeConfig(model=str(sort_task / "model"), template="{completion}",
                                                  parse=r"\d+"))])
    terms = RewardTerms([RewardTerm(judge=JudgeConfig(model=str(sort_task / "model"),
                                                      template="{completion} {missing}"))])
    with pytest.raises(PrefoptError, match="cannot fill 'missing' from the row"):
        terms(["p"], ["c"], [{"prompt": "p"}])
