"""Reward functions as TRL's GRPOTrainer calls them: by keyword, with conversational completions as message lists,
None, async, trainer_state, log_metric and log_extra; timeouts and isolated workers that crash or hang without
taking the trainer down. Each function below is written for TRL, with no prefopt import."""

import asyncio
import json
import os
import re
import time
from pathlib import Path

import pytest
from conftest import read_metrics, write_recipe

from prefopt.cli import train_recipe
from prefopt.errors import PrefoptError, RecipeError
from prefopt.recipe_online import RewardTerm
from prefopt.rewards import RewardTerms, TrainerState

# ----- functions written for TRL (open-r1's shapes) -------------------------------------------------------


def _text(completion):
    return completion[0]["content"] if isinstance(completion, list) else completion


def keyword_only(*, prompts, completions, completion_ids, **kwargs):
    """Length of the completion's ids, read by keyword only."""
    return [float(len(ids)) for ids in completion_ids]


def accuracy_reward(completions, answer, **kwargs):
    """open-r1's accuracy shape: a column as a positional parameter, the completion's content."""
    return [float(_text(c).split() == a.split()) for c, a in zip(completions, answer)]


def format_reward(completions, **kwargs):
    """open-r1's format shape: **kwargs only; 1 where the completion is numbers alone."""
    return [float(re.fullmatch(r"[\d ]*", _text(c)) is not None) for c in completions]


async def async_words(prompts, completions, **kwargs):
    await asyncio.sleep(0.2)
    return [float(len(_text(c).split())) for c in completions]


def none_for_long_prompts(prompts, completions, **kwargs):
    """None (does not apply) where the prompt has more than 4 numbers."""
    return [None if len(_text(p[-1]["content"] if isinstance(p, list) else p).split()) > 6 else 1.0
            for p, c in zip(prompts, completions)]


def step_scaled(completions, trainer_state, **kwargs):
    """Uses the trainer's progress: global_step / max_steps."""
    return [trainer_state.global_step / trainer_state.max_steps for _ in completions]


def logs_things(completions, log_metric=None, log_extra=None, **kwargs):
    log_metric("custom/mean_chars", sum(len(_text(c)) for c in completions) / len(completions))
    log_extra("chars", [len(_text(c)) for c in completions])
    return [0.0 for _ in completions]


def two_positional(p, c):
    return [0.0] * len(p)


def sleeps(completions, **kwargs):
    time.sleep(30)
    return [1.0] * len(completions)


def exits(completions, **kwargs):
    os._exit(3)


def loops(completions, **kwargs):
    while True:
        pass


def isolated_ok(completions, log_metric=None, **kwargs):
    log_metric("isolated/pid_differs", float(os.getpid() != int(os.environ.get("TEST_PARENT_PID", "0"))))
    return [float(len(_text(c))) for c in completions]


FORMS = {"keyword_only": keyword_only, "accuracy_reward": accuracy_reward, "format_reward": format_reward,
         "async_words": async_words, "none_for_long_prompts": none_for_long_prompts, "step_scaled": step_scaled}


def terms(*specs) -> RewardTerms:
    return RewardTerms([RewardTerm(**spec) for spec in specs])


def rows_for(prompts, answers):
    return [{"prompt": p, "prompt_ids": [1], "answer": a} for p, a in zip(prompts, answers)]


CHAT = [[{"role": "user", "content": "sort: 3 1 2 =>"}], [{"role": "user", "content": "sort: 9 8 7 6 5 4 =>"}]]
TEXT = ["sort: 3 1 2 =>", "sort: 9 8 7 6 5 4 =>"]


@pytest.mark.parametrize("prompts", [TEXT, CHAT], ids=["standard", "conversational"])
def test_each_trl_form_scores_what_the_function_computes(prompts):
    completions, answers, ids = [" 1 2 3", "x 4 5"], ["1 2 3", "4 5 6 7 8 9"], [[5, 6, 7], [8, 9]]
    scorer = terms(*({"function": f"test_rewards:{name}"} for name in FORMS))
    scores = scorer(prompts, completions, rows_for(prompts, answers), ids, TrainerState(3, 10))
    shown = [[{"role": "assistant", "content": c}] for c in completions] if prompts is CHAT else completions
    for i, (name, fn) in enumerate(FORMS.items()):
        kwargs = {"prompts": prompts, "completions": shown, "completion_ids": ids, "answer": answers,
                  "trainer_state": TrainerState(3, 10)}
        expected = fn(**kwargs)
        expected = asyncio.run(expected) if asyncio.iscoroutine(expected) else expected
        got = scores.terms[i].tolist()
        assert [None if g != g else g for g in got] == pytest.approx(expected), name
    assert scores.terms[FORMS.__len__() - 2].isnan().tolist() == [False, True]  # None: the term does not apply
    assert scores.total[1].item() == pytest.approx(2 + 0 + 0 + 3 + 0.3)  # nansum over the terms: None adds nothing
    assert set(f"timing/reward/{name}" for name in FORMS) <= set(scores.metrics)


def test_async_terms_run_concurrently():
    scorer = terms(*({"function": "test_rewards:async_words", "name": f"a{i}"} for i in range(4)))
    start = time.perf_counter()
    scorer(TEXT, ["a b", "c"], rows_for(TEXT, ["", ""]))
    assert time.perf_counter() - start < 0.6  # 4 x 0.2 s one after another would be 0.8 s
    scorer.close()


def test_log_metric_and_log_extra_reach_the_record_and_the_samples():
    scores = terms({"function": "test_rewards:logs_things"})(TEXT, ["ab", "abcd"], rows_for(TEXT, ["", ""]))
    assert scores.metrics["custom/mean_chars"] == 3.0 and scores.extra == {"chars": [2, 4]}


def test_a_positional_two_argument_function_is_refused_with_the_trl_form():
    with pytest.raises(RecipeError, match=r"takes \(p, c\).*def reward\(prompts, completions, \*\*kwargs\)"):
        terms({"function": "test_rewards:two_positional"})


def test_a_call_past_its_timeout_stops_with_the_term_named_or_scores_none():
    scorer = terms({"function": "test_rewards:sleeps", "timeout": 1.0})
    start = time.perf_counter()
    with pytest.raises(PrefoptError, match=r"rewards term 'sleeps'.*no answer within 1 s.*rows 0-1"):
        scorer(TEXT, ["a", "b"], rows_for(TEXT, ["", ""]))
    assert time.perf_counter() - start < 3
    skipping = terms({"function": "test_rewards:sleeps", "timeout": 0.5, "on_timeout": "skip"})
    scores = skipping(TEXT, ["a", "b"], rows_for(TEXT, ["", ""]))
    assert scores.terms.isnan().all() and scores.metrics["rewards/sleeps/timeouts"] == 1.0


def test_an_isolated_function_that_exits_or_loops_never_takes_the_trainer_down(monkeypatch):
    monkeypatch.setenv("TEST_PARENT_PID", str(os.getpid()))
    scorer = terms({"function": "test_rewards:isolated_ok", "isolate": True, "timeout": 60},
                   {"function": "test_rewards:exits", "isolate": True, "on_timeout": "skip"},
                   {"function": "test_rewards:loops", "isolate": True, "timeout": 2, "on_timeout": "skip"})
    start = time.perf_counter()
    scores = scorer(TEXT, ["ab", "abcd"], rows_for(TEXT, ["", ""]))
    assert scores.terms[0].tolist() == [2.0, 4.0] and scores.metrics["isolated/pid_differs"] == 1.0
    assert scores.terms[1:].isnan().all()
    assert scores.metrics["rewards/exits/timeouts"] == 1.0 and scores.metrics["rewards/loops/timeouts"] == 1.0
    assert time.perf_counter() - start < 30
    strict = terms({"function": "test_rewards:exits", "isolate": True})
    with pytest.raises(PrefoptError, match=r"'exits'.*worker process died \(exit code 3\)"):
        strict(TEXT, ["a", "b"], rows_for(TEXT, ["", ""]))
    scorer.close()
    strict.close()


# ----- in a GRPO run ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_task(tmp_path_factory):
    """The sorting prompts as conversations, with a Zephyr-templated tokenizer and a tiny model."""
    import tokenizer_zoo

    from prefopt.data.synthetic import build_tiny_model, sort_pair

    root = tmp_path_factory.mktemp("chat")
    tokenizer = tokenizer_zoo.zephyr(root / "tokenizer")
    build_tiny_model(tokenizer, root / "model")
    import random

    rng = random.Random(0)
    rows = [sort_pair(rng) for _ in range(64)]
    for name, messages in (("chat", True), ("text", False)):
        lines = [{"prompt": [{"role": "user", "content": r["prompt"]}] if messages else r["prompt"],
                  "answer": r["chosen"].strip()} for r in rows]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


@pytest.mark.parametrize("data", ["text", "chat"])
def test_trl_reward_functions_run_unchanged_in_a_grpo_run(chat_task, tmp_path, data):
    from trl.rewards import think_format_reward

    rewards = [{"function": f"test_rewards:{name}"} for name in FORMS]
    rewards += [{"function": "test_rewards:logs_things"}]
    if data == "chat":  # trl.rewards' own, as written for conversational completions
        rewards.append({"function": "trl.rewards:think_format_reward"})
    sections = {"method": "rl", "model": {"name_or_path": str(chat_task / "model")},
                "data": {"train": str(chat_task / f"{data}.jsonl"), "eval": None, "max_length": 64},
                "rewards": rewards, "rollout": {"samples_per_prompt": 2, "max_new_tokens": 6},
                "ppo": {"advantage": "grpo", "kl_coef": 0.0}, "eval": {"generate": 64},
                "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 2, "save_every": 0}}
    out = tmp_path / "run"
    train_recipe(write_recipe(tmp_path / "r.yaml", chat_task, out, **sections))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16
    answers = {json.dumps(json.loads(line)["prompt"]): json.loads(line)["answer"]
               for line in (chat_task / f"{data}.jsonl").read_text().splitlines()}
    for row in samples:  # each term's logged value is what the function computes on the logged sample
        completion = [{"role": "assistant", "content": row["completion"]}] if data == "chat" else row["completion"]
        kwargs = {"prompts": [row["prompt"]], "completions": [completion], "answer": [answers[json.dumps(row["prompt"])]],
                  "trainer_state": TrainerState(row["step"] - 1, 2)}
        for name in ("accuracy_reward", "format_reward", "none_for_long_prompts", "step_scaled"):
            value = FORMS[name](**kwargs)[0]
            assert row[name] == pytest.approx(value if value is not None else float("nan"), nan_ok=True), name
        assert row["async_words"] == len(row["completion"].split())
        assert row["chars"] == len(row["completion"])  # log_extra's column
        if data == "chat":
            assert row["think_format_reward"] == think_format_reward([completion])[0]
    records = read_metrics(out, timing=True)
    assert all("custom/mean_chars" in r and "timing/reward/async_words" in r for r in records)
    assert [r["rewards/step_scaled/mean"] for r in records] == [0.0, 0.5]


def test_a_reward_past_its_timeout_ends_the_run_in_time(chat_task, tmp_path):
    sections = {"method": "rl", "model": {"name_or_path": str(chat_task / "model")},
                "data": {"train": str(chat_task / "text.jsonl"), "eval": None, "max_length": 64},
                "rewards": [{"function": "test_rewards:sleeps", "timeout": 2}],
                "rollout": {"samples_per_prompt": 2, "max_new_tokens": 4}, "ppo": {"advantage": "grpo", "kl_coef": 0.0},
                "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "save_every": 0}}
    path = write_recipe(tmp_path / "r.yaml", chat_task, tmp_path / "run", **sections)
    start = time.perf_counter()
    with pytest.raises(PrefoptError, match=r"rewards term 'sleeps' \(test_rewards:sleeps\): no answer within 2 s"):
        train_recipe(path)
    assert time.perf_counter() - start < 25  # model loading included; the term alone sleeps 30 s
    assert not Path(tmp_path / "run" / "final").exists()
