"""What a new user trips over: the command line's hints, launcher settings the recipe overrides said aloud, the
run's own record of a trainer class, one name per metric, a KL that cannot go negative, labelling that cannot
silently write nothing, and vLLM's console."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_metrics, write_recipe

from prefopt import recipe as recipe_lib
from prefopt.cli import main
from prefopt.errors import PrefoptError
from prefopt.trainers import PreferenceTrainer


def test_train_without_a_recipe_prints_usage_with_examples(capsys):
    assert main(["train"]) == 2
    out = capsys.readouterr().out
    assert "usage: prefopt train" in out and "prefopt train quickstart" in out and "key.sub=value" in out


def test_a_flag_for_a_recipe_key_is_answered_with_the_override(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "r.yaml", "--beta", "0.1", "--max-steps=5"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "recipe keys are set as key.sub=value: did you mean" in err
    assert "loss.beta=0.1" in err and "train.max_steps=5" in err


def test_a_word_stands_for_a_list_of_one(sort_task, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run")
    assert recipe_lib.load(path, ["log.to=tensorboard"]).log.to == ["tensorboard"]


def test_recipes_lists_recipes_not_launch_configs_and_survives_a_closed_pipe():
    result = subprocess.run(f"{sys.executable} -m prefopt recipes | head -2", shell=True, capture_output=True,
                            text=True)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    listing = subprocess.run([sys.executable, "-m", "prefopt", "recipes"], capture_output=True, text=True).stdout
    recipes = [line.strip() for line in listing.splitlines() if line.startswith("  ")]
    assert "dpo/quickstart.yaml" in recipes and not any(r.startswith("accelerate/") for r in recipes)
    assert "launch configs, not recipes" in listing and "zero3" in listing


def test_a_push_that_cannot_reach_the_hub_does_not_ask_for_a_login(tmp_path, monkeypatch):
    from prefopt.run.card import push

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "README.md").write_text("a card")
    with pytest.raises(PrefoptError) as error:
        push(tmp_path, "me/model")
    assert "could not be reached" in str(error.value) and "login" not in str(error.value)


def test_start_says_the_precision_and_what_the_recipe_overrode(sort_task, tmp_path, monkeypatch, capsys):
    """An Accelerate config's mixed_precision and gradient_accumulation_steps (accelerate launch passes them as
    ACCELERATE_*) lose to the recipe: said at start, with the key that decides; MLflow's file store says how
    to read it."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    from prefopt.cli import train_recipe

    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train={"max_steps": 1},
                              log={"to": ["mlflow"]}))
    out = capsys.readouterr().out
    assert "mixed precision no (train.mixed_precision: auto, fp32 on a CPU" in out
    assert "the launcher's config asked for bf16: the recipe decides" in out
    assert "the launcher's gradient_accumulation_steps 4 is not used" in out
    assert "MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file://" in out


class Renamed(PreferenceTrainer):
    """A trainer class given from Python."""


def test_a_trainer_class_from_python_is_recorded_by_its_import_path(sort_task, tmp_path):
    import prefopt

    prefopt.train(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train={"max_steps": 1}),
                  trainer=Renamed)
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["trainer"] == "test_usability:Renamed"
    prefopt.train(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train={"max_steps": 2}),
                  trainer=Renamed)  # the same run resumes: the recorded class does not change its identity
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_sft_logs_log_probs_not_rewards(sort_task, tmp_path):
    from prefopt.cli import train_recipe

    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", method="sft", loss={"name": "sft"},
                              data={"train": str(sort_task / "sft.jsonl"), "eval": str(sort_task / "eval.jsonl")},
                              train={"max_steps": 2, "eval_every": 2}))
    for record in read_metrics(tmp_path / "run") + read_metrics(tmp_path / "run", "eval"):
        assert not any(key.startswith("rewards/") for key in record), record
    assert "logps/per_token" in read_metrics(tmp_path / "run")[0]
    assert "logps/per_token_accuracy" in read_metrics(tmp_path / "run", "eval")[0]  # held-out pairs


def test_prefopt_eval_names_its_data_as_given(sort_task, tmp_path, capsys):
    from prefopt.cli import train_recipe

    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train={"max_steps": 1}))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", str(sort_task / "eval.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "prefopt eval --data: 48 examples" in out and "data.train" not in out
    assert json.loads(out[out.index("{"):])["pairs"] == 48


def test_the_evaluation_kl_is_k3_and_never_negative():
    """sample_kl sums Schulman's k3 over the sampled tokens: >= 0 where the summed log-ratio (k1) is not."""
    from prefopt.online.experience import sample_kl

    logps = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -1.0]])
    ref = torch.tensor([[-0.5, -2.5, -0.2], [-2.0, -0.3, -4.0]])

    policy, reference = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)

    def forward(model, input_ids, attention_mask, mask, temperature=None):
        return (logps if model is policy else ref), None, None

    class Acc:
        device = "cpu"

        @staticmethod
        def autocast():
            return torch.autocast("cpu", enabled=False)

    batch = {"prompt_ids": torch.ones(2, 1, dtype=torch.long), "prompt_mask": torch.ones(2, 1, dtype=torch.long),
             "response_ids": torch.ones(2, 3, dtype=torch.long), "mask": torch.tensor([[1.0, 1, 1], [1, 1, 0]])}
    kl = sample_kl(forward, policy, reference, "copy", Acc())(batch)
    log_r = (ref - logps) * batch["mask"]
    assert torch.allclose(kl, (torch.expm1(log_r) - log_r).sum(1))
    assert (kl >= 0).all() and ((logps - ref) * batch["mask"]).sum(1)[0] < 0  # k1 of row 0 is negative


def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def test_labelling_that_makes_no_pair_fails_and_keeps_what_it_scored(tmp_path):
    from argparse import Namespace

    from prefopt.labeling import label_file

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"p{i}", "completions": ["a", "b"]}) + "\n" for i in range(3)))
    args = Namespace(input=str(rows), out=str(tmp_path / "pairs.jsonl"), policy=None, reward=[],
                     verifier="test_usability:constant", aggregate="mean", std_coef=1.0)
    with pytest.raises(PrefoptError, match="0 pairs from 3 prompts"):
        label_file(args)
    assert not (tmp_path / "pairs.jsonl").exists()
    scored = [json.loads(line) for line in (tmp_path / "pairs.samples.jsonl").read_text().splitlines()]
    assert len(scored) == 3 and scored[0]["scores"] == [1.0, 1.0]


def test_vllm_rotary_reload_warning_is_dropped_and_others_kept():
    from prefopt.run.tracking import quiet_libraries

    quiet_libraries()
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "%s: Failed to load weights",
                               ("RotaryEmbedding",), None)
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "%s: Failed to load weights",
                              ("QKVParallelLinear",), None)
    assert not logger.filter(record) and logger.filter(other)


def test_docs_give_times_with_their_conditions():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "about 30 s" not in readme
