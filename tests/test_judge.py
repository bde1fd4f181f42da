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
    with pytest.raises(RecipeError, match="must show {completion}"):
        RewardTerms([RewardTerm(judge=JudgeConfig(model=str(sort_task / "model"), template="{prompt}"))])
    with pytest.raises(RecipeError, match="must have one group"):
        RewardTerms([RewardTerm(judge=JudgeConfig(model=str(sort_task / "model"), template="{completion}",
                                                  parse=r"\d+"))])
    terms = RewardTerms([RewardTerm(judge=JudgeConfig(model=str(sort_task / "model"),
                                                      template="{completion} {missing}"))])
    with pytest.raises(PrefoptError, match="cannot fill 'missing' from the row"):
        terms(["p"], ["c"], [{"prompt": "p"}])


def test_a_judge_on_an_engine_server_scores_as_the_one_in_process(sort_task):
    """judge.server: spawn: the verdicts come from `prefopt serve JUDGE` (Hugging Face greedy there); the same
    scores as the judge run in the trainer's process."""
    config = dict(model=str(sort_task / "model"), template=TEMPLATE, parse="test_judge:verdict_length",
                  max_new_tokens=6)
    prompts, completions = ["sort: 3 1 =>", "sort: 2 5 4 =>", "sort: 7 =>"], [" 1 3", " 2 4", ""]
    rows = [{"prompt": p, "answer": "x"} for p in prompts]
    local = RewardTerms([RewardTerm(judge=JudgeConfig(**config))])(prompts, completions, rows)
    from prefopt.online.served import judge_engine

    with pytest.raises(RecipeError, match="a served judge .* scores the samples of online runs"):
        RewardTerms([RewardTerm(judge=JudgeConfig(**config, server="spawn"))])  # an offline eval.rewards
    served = RewardTerms([RewardTerm(judge=JudgeConfig(**config, server="spawn"))], serve_judge=judge_engine)
    try:
        assert served(prompts, completions, rows).total.tolist() == local.total.tolist()
    finally:
        served.close()


def test_a_pairwise_judge_reads_a_or_b_in_both_orders(sort_task, monkeypatch):
    """pairs.judge as a judge model: each pair judged as (a, b) and as (b, a); A means the first shown wins, B the
    second, a number in [0, 1] is P(first wins); an unreadable verdict is a tie, counted."""
    from prefopt.judge import PairwiseJudge

    judge = PairwiseJudge(JudgeConfig(model=str(sort_task / "model"), parse=r"^(\S+)"), "judge", "pairs.judge")
    shown = []

    def verdicts(ids):
        shown.extend(judge.tokenizer.decode(i) for i in ids)
        return ["A", "B", "0.8", "huh",  # (a, b) of the 4 pairs
                "B", "B", "0.4", "A"]  # then (b, a)

    monkeypatch.setattr(judge, "verdicts", verdicts)
    p = judge(["p"] * 4, ["a1", "a2", "a3", "a4"], ["b1", "b2", "b3", "b4"])
    # first order: 1, 0, 0.8, 0.5 (tie); swapped (b first): b wins 0, 0, 0.4, 1 -> a wins 1, 1, 0.6, 0
    assert p == pytest.approx([1.0, 0.5, 0.7, 0.25])
    assert judge.unparsed == pytest.approx(1 / 8)
    assert "a1" in shown[0] and "b1" in shown[0] and shown[0].index("a1") < shown[0].index("b1")
    assert shown[4].index("b1") < shown[4].index("a1")
    with pytest.raises(RecipeError, match="must show {completion_b}"):
        PairwiseJudge(JudgeConfig(model=str(sort_task / "model"), template="{completion_a}"), "judge", "pairs.judge")


def test_online_dpo_ranks_its_samples_with_a_judge_model(sort_task, tmp_path):
    from test_online import online_sections

    sections = online_sections()
    sections["pairs"] = {"judge": {"model": str(sort_task / "model"), "parse": r"(\d)", "max_new_tokens": 3}}
    sections["train"] = {**sections["train"], "max_steps": 2}
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))
    records = read_metrics(tmp_path / "run")
    assert len(records) == 2 and all(0.0 <= r["pairs/judge_unparsed"] <= 1.0 for r in records)
