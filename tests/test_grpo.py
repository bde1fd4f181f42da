"""The GRPO family on the trainer: a gradient that does not depend on how the mini-batch is cut, reward terms that
read the data's columns (and stop with a clear error when they misbehave), DAPO's dynamic sampling, and the
rollout's bookkeeping (timing, per-term metrics, one forward fewer with one update per rollout)."""

import json
import math

import pytest
import torch
from conftest import read_metrics, write_recipe
from test_distributed import compare, run_two

from prefopt import recipe as recipe_lib
from prefopt.cli import train_recipe
from prefopt.errors import PrefoptError
from prefopt.trainers import PPOTrainer


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    """The addition task and a policy that knows a little of it (40 SFT steps): its completions end at
    different lengths, so micro-batches hold different numbers of tokens."""
    from prefopt.data.synthetic import write_arithmetic_task

    task = write_arithmetic_task(tmp_path_factory.mktemp("arithmetic"), n_train=256, n_eval=32)
    sft = {"model": {"name_or_path": str(task / "model")},
           "data": {"train": str(task / "sft.jsonl"), "eval": None, "max_length": 32, "max_prompt_length": 24},
           "loss": {"name": "sft"}, "train": {"batch_size": 32, "micro_batch_size": 32, "max_steps": 40}}
    train_recipe(write_recipe(task / "sft.yaml", task, task / "sft", **sft))
    return task


def trainer_for(tmp_path, task, sections, name="run") -> PPOTrainer:
    trainer = PPOTrainer(recipe_lib.load(write_recipe(tmp_path / f"{name}.yaml", task, tmp_path / name, **sections)))
    trainer.output_dir.mkdir(parents=True)  # where fit() would have made it: rollouts append samples.jsonl
    return trainer


def grpo_sections(task, **ppo):
    return {"method": "rl", "model": {"name_or_path": str(task / "sft" / "final")},
            "data": {"train": str(task / "train.jsonl"), "eval": None, "max_length": 32, "max_prompt_length": 24},
            "rewards": [{"function": "prefopt.data.synthetic:arithmetic_correct"},
                        {"function": "prefopt.data.synthetic:number_format", "weight": 0.5}],
            "rollout": {"samples_per_prompt": 4, "max_new_tokens": 8},
            "ppo": {"advantage": "grpo", "kl_coef": 0.0, **ppo},
            "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
            "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 5, "save_every": 0, "log_every": 1}}


VARIANTS = {
    "grpo": {},  # sequence_mean, group-scaled advantages
    # token_mean over the mini-batch, clip-higher, two mini-batches per rollout (and below: the soft overlong
    # punishment and dynamic sampling)
    "dapo": {"loss_aggregation": "token_mean", "clip_high": 0.28, "num_mini_batches": 2},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_and_gradient_do_not_depend_on_how_the_mini_batch_is_cut(arithmetic, tmp_path, variant):
    """Micro-batch 8 x accumulation 1, micro-batch 2 x accumulation 4, and 2 processes x micro-batch 4: the same
    loss and gradient norm at every step (fp32). The completions' lengths differ (some end, some run to
    max_new_tokens), so a token mean per micro-batch would weigh tokens differently in each layout."""
    sections = grpo_sections(arithmetic, **VARIANTS[variant])
    sections["rewards"].append({"function": "test_ppo:length_score", "weight": 0.1})  # a signal in most groups
    sections["data"]["eval"] = str(arithmetic / "eval.jsonl")  # greedy evaluation, split over the processes
    if variant == "dapo":
        sections["rollout"].update(overlong={"buffer": 4, "penalty": 0.5}, filter_groups=True)
    runs = {}
    for name, micro in (("whole", 8), ("accumulated", 2), ("two", 4)):
        sections["train"]["micro_batch_size"] = micro
        runs[name] = tmp_path / name
        path = write_recipe(tmp_path / f"{name}.yaml", arithmetic, runs[name], **sections)
        if name == "two":
            run_two(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"], path)
        else:
            train_recipe(path)
    info = json.loads((runs["two"] / "run.json").read_text())
    assert info["world_size"] == 2 and json.loads((runs["accumulated"] / "run.json").read_text())[
        "accumulation_steps"] == 4
    records = read_metrics(runs["whole"])
    assert len(records) == 5
    assert any(0 < r["rollout/eos"] < 1 for r in records)  # lengths differ within a rollout
    assert all(r["grad_norm"] > 0 for r in records)
    compare(runs["whole"], runs["accumulated"])
    compare(runs["whole"], runs["two"])


def test_reward_terms_read_the_rows_columns_and_log_each_term(arithmetic, tmp_path):
    out = tmp_path / "run"
    sections = grpo_sections(arithmetic)
    sections["rewards"].append({"function": "test_grpo:not_for_even_answers", "name": "odd", "weight": 2.0})
    sections["train"].update(max_steps=2)
    train_recipe(write_recipe(tmp_path / "r.yaml", arithmetic, out, **sections))
    record = read_metrics(out, timing=True)[0]
    for term in ("arithmetic_correct", "number_format", "odd"):
        assert f"rewards/{term}/mean" in record and f"rewards/{term}/std" in record
    # odd answers score 1 under the third term; even ones do not apply (None) and are left out of its mean
    assert record["rewards/odd/mean"] == 1.0 and record["rewards/odd/std"] == 0.0
    for key in ("timing/generate", "timing/score", "timing/logps", "timing/update", "rollout/tokens_per_second"):
        assert record[key] > 0, key
    # the total is the weighted sum, with None counting 0: rebuild it from the samples' rows
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for sample in samples:
        answer = str(sum(int(x) for x in sample["prompt"].removeprefix("add:").removesuffix("=").split("+")))
        found = sample["completion"].split()
        correct = float(bool(found) and found[0] == answer)
        form = float(sample["completion"].strip().lstrip("-").isdigit())
        assert sample["score"] == pytest.approx(correct + 0.5 * form + 2.0 * (int(answer) % 2), abs=1e-6)


def not_for_even_answers(prompts, completions, answer):
    return [1.0 if int(a) % 2 else None for a in answer]


def asks_for_a_missing_column(prompts, completions, solution):
    return [0.0] * len(prompts)


def raises_on_seven(prompts, completions, answer):
    if "7" in answer:
        raise ValueError("cannot score seven")
    return [0.0] * len(prompts)


def wrong_length(prompts, completions):
    return [0.0]


def nan_score(prompts, completions):
    return [math.nan] * len(prompts)


@pytest.mark.parametrize("function,message", [
    ("raises_on_seven", r"rewards term 'raises_on_seven' .* raised ValueError: cannot score seven, on the "
                        r"completion .* of prompt 'add: \d+ \+ \d+ ='"),
    ("wrong_length", r"rewards term 'wrong_length' .* returned 1 values for \d+ completions"),
    ("nan_score", r"rewards term 'nan_score' .* gave nan for the completion .* of prompt 'add: "),
])
def test_a_reward_function_that_misbehaves_is_named_with_the_row(arithmetic, tmp_path, function, message):
    sections = grpo_sections(arithmetic)
    sections["rewards"] = [{"function": f"test_grpo:{function}"}]
    trainer = trainer_for(tmp_path, arithmetic, sections)
    with pytest.raises(PrefoptError, match=message):
        for cycle in range(8):  # until a rollout holds an answer with a 7
            trainer._rollout(cycle)


def test_a_column_the_data_lacks_fails_at_start_up(arithmetic, tmp_path):
    sections = grpo_sections(arithmetic)
    sections["rewards"] = [{"function": "test_grpo:asks_for_a_missing_column"}]
    recipe = recipe_lib.load(write_recipe(tmp_path / "r.yaml", arithmetic, tmp_path / "run", **sections))
    with pytest.raises(PrefoptError, match=r"takes column 'solution', but 256 of 256 rows of data.train lack it; "
                                           r"their columns are answer"):
        PPOTrainer(recipe)


def constant_for_multiples_of_three(prompts, completions, answer):
    """No signal (every completion the same score) where the answer is a multiple of 3; else the length."""
    return [0.0 if int(a) % 3 == 0 else len(c) for a, c in zip(answer, completions)]


@pytest.mark.parametrize("max_rounds", [4, 1])
def test_dynamic_sampling_drops_groups_without_signal_and_refills(arithmetic, tmp_path, max_rounds):
    """Prompts whose answer is a multiple of 3 get one score for every completion: those groups are dropped and
    counted, and further rounds of prompts fill the rollout. With one round allowed, the dropped fill the rest."""
    sections = grpo_sections(arithmetic)
    sections["rewards"] = [{"function": "test_grpo:constant_for_multiples_of_three"}]
    sections["rollout"].update(filter_groups=True, filter_max_rounds=max_rounds)
    sections["train"].update(batch_size=16, micro_batch_size=16)
    trainer = trainer_for(tmp_path, arithmetic, sections)
    trainer._rollout(0)
    stats = trainer.buffer.stats
    rounds = int(stats["rollout/sampling_rounds"])
    answers = [[int(row["answer"]) for row in trainer.sampler.prompts.draw(0, r, 4)] for r in range(rounds)]
    # every group of a multiple of 3 scores the same; any other group could tie by chance: at least those
    no_signal = sum(a % 3 == 0 for group in answers for a in group)
    assert stats["rollout/groups_filtered"] >= no_signal > 0
    groups = trainer.buffer.advantages.view(4, 4, -1).abs().sum((1, 2))  # (prompts,)
    kept = int((groups > 0).sum())
    assert kept == 4 - stats["rollout/groups_short"]
    if max_rounds == 4:
        assert rounds > 1 or no_signal == 0
    else:
        assert rounds == 1 and stats["rollout/groups_short"] == stats["rollout/groups_filtered"]


def test_one_update_per_rollout_uses_its_own_log_probs(arithmetic, tmp_path):
    """One epoch of one mini-batch and no KL in the reward: the rollout skips the policy's forward (the update's
    own log-probs, detached, are the old ones: the ratio is 1); with two mini-batches it keeps them."""
    for mini_batches, fused in ((1, True), (2, False)):
        sections = grpo_sections(arithmetic, num_mini_batches=mini_batches)
        trainer = trainer_for(tmp_path, arithmetic, sections, f"run{mini_batches}")
        assert trainer.fused_old_logps is fused and trainer.reference is None
        trainer._rollout(0)
        assert (trainer.buffer.old_logps is None) is fused


def test_dr_grpo_and_gspo_run(arithmetic, tmp_path):
    for name, ppo in {"dr_grpo": {"advantage_scale": "none", "loss_aggregation": "constant"},
                      "gspo": {"ratio": "sequence", "num_mini_batches": 2, "clip": 3e-4, "dual_clip": 3.0}}.items():
        out = tmp_path / name
        sections = grpo_sections(arithmetic, **ppo)
        sections["rewards"].append({"function": "test_ppo:length_score", "weight": 0.1})
        sections["train"].update(max_steps=2)
        train_recipe(write_recipe(tmp_path / f"{name}.yaml", arithmetic, out, **sections))
        records = read_metrics(out)
        assert records and all(math.isfinite(r["loss"]) for r in records)
        if name == "gspo":  # the second mini-batch's ratios moved
            assert records[1]["policy/approx_kl"] > 0
    recipe = recipe_lib.load(write_recipe(tmp_path / "grpo.yaml", arithmetic, tmp_path / "x",
                                          **grpo_sections(arithmetic)))
    assert (recipe.ppo.advantage_scale, recipe.ppo.loss_aggregation) == ("group", "sequence_mean")
    assert torch.isfinite(torch.tensor(recipe.ppo.clip_high))


def test_groups_share_their_prompt(arithmetic, tmp_path):
    """The k samples of a prompt packed behind one copy of it against the plain padded rows: the same losses,
    gradient norms and metrics over 4 steps (fp32, 1e-5), for the rollout's log-probs (policy and reference) and
    the update."""
    runs = {}
    for name, share in (("shared", True), ("padded", False)):
        sections = grpo_sections(arithmetic, kl_coef=0.05, kl_penalty="loss", num_mini_batches=2)
        sections["rewards"].append({"function": "test_ppo:length_score", "weight": 0.1})
        sections["train"].update(max_steps=4, micro_batch_size=4, share_prompt=share)
        sections["data"]["eval"] = str(arithmetic / "eval.jsonl")
        runs[name] = tmp_path / name
        path = write_recipe(tmp_path / f"{name}.yaml", arithmetic, runs[name], **sections)
        trainer = PPOTrainer(recipe_lib.load(path))
        assert trainer.forward.share_prompt is share
        trainer.fit()
        trainer.close()
    compare(runs["shared"], runs["padded"])


def test_sharing_a_prompt_is_chosen_where_it_pays():
    """Unset, train.share_prompt packs a batch only where its cost (6 h x tokens + sum of squared row lengths)
    shrinks. 2 prompts x 3 samples, hidden 64 (6 h = 384): prompt 10 and completions 2 tokens: packed
    384 x 32 + 2 x 16^2 = 12800 < padded 384 x 72 + 6 x 12^2 = 28512, shared; prompt 2 and completions 20:
    packed 384 x 124 + 2 x 62^2 = 55304 > padded 384 x 132 + 6 x 22^2 = 53592, padded."""
    from prefopt.online.experience import sharing_pays

    def rows(prompt, completion):
        ids = torch.zeros(6, prompt + completion, dtype=torch.long)
        ids[:, :prompt] = torch.arange(6)[:, None] // 3 + 5  # two prompts, three samples each
        return ids, torch.ones_like(ids), completion, 64

    assert sharing_pays(*rows(10, 2)) and not sharing_pays(*rows(2, 20))
