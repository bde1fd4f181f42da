"""PPO on the shared loop: runs for each advantage estimator, resumes exactly (two processes: test_distributed),
stops an epoch on approximate KL, and trains a LoRA policy with its value head."""


import pytest
import torch
from conftest import assert_resume_matches, assert_same_records, read_metrics, stop_and_continue, write_recipe

from prefopt import recipe as recipe_lib
from prefopt.cli import train_recipe
from prefopt.errors import RecipeError
from prefopt.trainers import PPOTrainer


def length_score(prompts, completions):
    """A reward the tiny random model can move (it never sorts): longer completions score higher."""
    return [len(c) / 10 for c in completions]


def ppo_sections(**ppo):
    return dict(data={"eval": None}, rewards={"function": "test_ppo:length_score"},
                rollout={"samples_per_prompt": 2, "max_new_tokens": 8},
                ppo={"advantage": "gae", "epochs": 1, "num_mini_batches": 2, **ppo},
                train={"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "save_every": 2, "log_every": 1})


@pytest.mark.parametrize("advantage", ["gae", "rloo", "grpo", "reinforce"])
def test_ppo_runs_and_logs(sort_task, tmp_path, advantage):
    out = tmp_path / "run"
    sections = ppo_sections(advantage=advantage)
    sections["data"] = {"eval": str(sort_task / "eval.jsonl")}
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, **sections))
    train = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "policy/clipfrac", "policy/approx_kl", "policy/entropy", "rollout/score", "rollout/kl",
                "rollout/kl_per_token", "rollout/length", "rollout/eos", "rollout/shaped_reward"):
        assert key in train[0], key
    assert ("value/loss" in train[0]) == (advantage == "gae")
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [0, 4] and evals[0]["score"] >= 0
    assert (out / "final" / "config.json").exists() and (out / "samples.jsonl").exists()
    assert (out / "final" / "value_head.pt").exists() == (advantage == "gae")


@pytest.mark.parametrize("ppo", [{"advantage": "gae"}, {"advantage": "gae", "critic": "separate"},
                                 {"advantage": "grpo"}, {"advantage": "grpo", "loss_aggregation": "token_mean",
                                                         "clip_high": 0.28, "filter_groups": True}],
                         ids=["gae", "gae-separate-critic", "grpo", "dapo-dynamic-sampling"])
def test_ppo_resume_continues_exactly(sort_task, tmp_path, ppo):
    """Stopped at step 2 (a rollout boundary) and resumed: the same rollouts (restored RNG; dynamic sampling's
    further prompts drawn from (seed, rollout, round)), the same value head (and critic), optimizer and KL
    controller, so the same losses."""
    ppo = dict(ppo)
    filter_groups = ppo.pop("filter_groups", False)
    sections = ppo_sections(**ppo, target_kl=0.01)
    sections["rollout"]["filter_groups"] = filter_groups
    sections["optim"] = {"schedule": "constant", "warmup_steps": 0, "lr": 1e-3}
    assert_resume_matches(sort_task, tmp_path, **sections)


def test_approx_kl_stop_skips_the_rest_of_an_epoch(sort_task, tmp_path):
    """epochs 2 x mini-batches 2, bound ~0. Step 1 sees the rollout's own policy (approximate KL 0) and
    step 2 ends epoch 1 anyway; step 3 starts epoch 2, its approximate KL passes the bound, so step 4,
    the rest of that epoch, is skipped."""
    out = tmp_path / "run"
    sections = ppo_sections(epochs=2, approx_kl_stop=1e-12)
    sections["train"].update(max_steps=4, save_every=4)
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, **sections))
    train = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3]  # step 4 was skipped
    assert train[0]["policy/approx_kl"] == 0.0 and train[2]["policy/approx_kl"] > 1e-12


def test_lora_policy_trains_adapter_and_value_head(sort_task, tmp_path):
    sections = ppo_sections()
    sections["model"] = {"lora": {"r": 4, "alpha": 8}}
    recipe = recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))
    assert recipe.reference.kind == "adapter_off"
    trainer = PPOTrainer(recipe)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("value_head.") for n in trainable)
    assert any(n.startswith("value_head.") for n in trainable) and trainer.reference is None
    trainer.fit()
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("sections,message", [
    ({"rewards": []}, "give at least one term"), ({"rewards": {}}, "give models .reward models., function .module:function., judge"),
    ({"rollout": {"samples_per_prompt": 1}, "ppo": {"advantage": "rloo"}}, "too few for advantage rloo"),
    ({"rollout": {"samples_per_prompt": 3}}, "must be a multiple of rollout.samples_per_prompt"),
    ({"reference": {"kind": "precomputed"}}, "cannot give the per-token reference log-probs"),
    ({"train": {"batch_size": 8, "micro_batch_size": 4, "save_every": 3}}, "multiple of ppo.epochs"),
    ({"ppo": {"advantage": "grpoo"}}, "unknown estimator 'grpoo'; known: gae, grpo"),
    ({"ppo": {"advantage": "gae", "advantage_scale": "group"}}, "needs a sequence-level advantage"),
    ({"ppo": {"whiten_advantages": False}}, "did you mean 'ppo.advantage_scale'"),
    ({"ppo": {"dual_clip": 0.5}}, "ppo.dual_clip: must be > 1"),
    ({"ppo": {"clip_low": 1.5}}, "ppo.clip_low: must be below 1"),
    ({"rollout": {"overlong": {"buffer": 9}}}, "rollout.overlong.buffer: 9 is more than rollout.max_new_tokens"),
    ({"rollout": {"filter_groups": True, "samples_per_prompt": 1}, "ppo": {"advantage": "reinforce"}},
     "too few for advantage reinforce with rollout.filter_groups"),
    ({"rewards": [{"function": "a:f"}, {"function": "b:f"}]}, "two terms share a name"),
    ({"rewards": {"function": "a:f", "weight": float("nan")}}, "weight: must be a finite number"),
])
def test_ppo_recipe_errors(sort_task, tmp_path, sections, message):
    merged = ppo_sections()
    for key, value in sections.items():
        merged[key] = {**merged.get(key, {}), **value} if key != "rewards" else value
    with pytest.raises(RecipeError, match=message):
        recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **merged))


def test_separate_critic_trains_beside_the_policy(sort_task, tmp_path):
    sections = ppo_sections(critic="separate")
    trainer = PPOTrainer(recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections)))
    trainable = {n.split(".")[0] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"policy", "critic", "value_head"}
    before = {n: p.detach().clone() for n, p in trainer.model.critic.named_parameters()}
    trainer.fit()
    assert any(not torch.equal(before[n], p) for n, p in trainer.accelerator.unwrap_model(trainer.model)
               .critic.named_parameters())
    assert (tmp_path / "run" / "final" / "critic" / "config.json").exists()


def test_a_fixed_lag_is_off_policy_corrected_and_resumes_exactly(sort_task, tmp_path):
    """rollout.lag 1: the rollout of each update is generated one update earlier (the first two by the starting
    policy), weighed by ppo.engine_is (truncate by default) against the current policy; a run stopped after 2
    steps and continued repeats the uninterrupted one, rollouts generated ahead included (they are in the
    checkpoint); lag 0 is the on-policy loop."""
    sections = ppo_sections(advantage="grpo")
    sections["rollout"] = {**sections["rollout"], "lag": 1}
    sections["ppo"] = {**sections["ppo"], "num_mini_batches": 1}
    sections["train"] = {**sections["train"], "batch_size": 8, "max_steps": 4, "save_every": 2}
    sections["optim"] = {"schedule": "constant", "warmup_steps": 0, "lr": 1e-2}
    whole, resumed = stop_and_continue(write_recipe(tmp_path / "a.yaml", sort_task, tmp_path / "a", **sections),
                                       write_recipe(tmp_path / "b.yaml", sort_task, tmp_path / "b", **sections))
    assert_same_records(whole, resumed)
    assert [r["rollout/staleness"] for r in whole] == [0, 1, 1, 1]
    assert whole[0]["rollout/is_weight_mean"] == pytest.approx(1.0)  # generated and updated by the same policy
    assert any(abs(r["rollout/is_weight_mean"] - 1) > 1e-6 for r in whole[1:])  # one update apart
    sync = {**sections, "rollout": {**sections["rollout"], "lag": 0}}
    train_recipe(write_recipe(tmp_path / "c.yaml", sort_task, tmp_path / "c", **sync))
    on_policy = read_metrics(tmp_path / "c")
    assert "rollout/staleness" not in on_policy[0]  # the first rollout the same: the behaviour log-probs, kept
    for key in ("loss", "grad_norm", "rollout/score"):  # while sampling, only round off from the update's
        assert on_policy[0][key] == pytest.approx(whole[0][key], abs=1e-5), key
    assert on_policy[1]["rollout/score"] != whole[1]["rollout/score"] or on_policy[1]["loss"] != whole[1]["loss"]


def test_one_update_per_rollout_weighs_the_lag_in_its_own_forward(sort_task, tmp_path):
    """With one update per rollout the proximal policy is the one being updated: its log-probs, and with them the
    lag's importance weights, come from the update's own forward (no forward at the rollout). The same losses,
    gradients and weights as the separate forward at the rollout, in every engine_is mode."""
    for mode in ("truncate", "sequence_mask"):
        sections = ppo_sections(advantage="grpo", num_mini_batches=1, kl_penalty="loss", engine_is=mode, engine_is_low=0.99,
                                engine_is_cap=1.01)
        sections["rollout"] = {**sections["rollout"], "lag": 1}
        sections["optim"] = {"schedule": "constant", "warmup_steps": 0, "lr": 3e-2}
        runs = {}
        for fused in (True, False):
            out = tmp_path / f"{mode}-{fused}"
            trainer = PPOTrainer(recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, out, **sections)))
            assert trainer.fused_old_logps
            trainer.fused_old_logps = fused
            trainer.fit()
            runs[fused] = read_metrics(out)
        assert any(r["rollout/is_corrected_fraction"] > 0 for r in runs[False])  # the narrow band rejects some
        for a, b in zip(runs[True], runs[False]):
            for key in ("loss", "grad_norm", "rollout/is_weight_mean", "rollout/is_corrected_fraction"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (mode, a["step"], key)
