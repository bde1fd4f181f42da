"""Crashes that used to be tracebacks: a full disk while safetensors writes, a starting model with NaN weights,
a sequence limit past the model's positions, Ctrl-C during start-up, a signal while final/ is written."""

import signal

import pytest
import torch
from conftest import write_recipe
from safetensors import SafetensorError

from prefopt import recipe as recipe_lib
from prefopt.cli import main, train_recipe
from prefopt.errors import RecipeError, TrainingError

FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def full_disk(*args, **kwargs):
    raise SafetensorError(FULL)


@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_a_full_disk_while_safetensors_writes_is_one_message_and_leaves_nothing_behind(sort_task, tmp_path,
                                                                                       monkeypatch, where):
    import accelerate.utils.other
    import transformers.modeling_utils

    target = (accelerate.utils.other, "safe_save_file") if where == "checkpoint" else (
        transformers.modeling_utils, "safe_save_file")
    monkeypatch.setattr(*target, full_disk)
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", sort_task, out, train={"max_steps": 2, "save_every": 1})
    with pytest.raises(TrainingError, match=r"the disk is full .* free at .*previous checkpoints and final/ are intact"):
        train_recipe(path)
    assert not [p for p in out.rglob(".tmp-*")]


def test_the_reference_cache_on_a_full_disk_is_one_message(sort_task, tmp_path, monkeypatch):
    import prefopt.reference

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prefopt.reference.torch, "save", no_space)
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train={"max_steps": 1},
                        reference={"kind": "precomputed", "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(TrainingError, match="reference log-probs cache.*the disk is full"):
        train_recipe(path)
    assert not list((tmp_path / "cache").glob(".*"))


def test_a_starting_model_with_nan_weights_is_named(sort_task, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sort_task / "model")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(sort_task / "model").save_pretrained(tmp_path / "nan")
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", model={"name_or_path": str(tmp_path / "nan")})
    with pytest.raises(RecipeError, match=r"non-finite values in 1 weight\(s\): model.layers.1.mlp.up_proj.weight"):
        train_recipe(path)


def test_a_sequence_limit_past_the_models_positions_is_refused(sort_task, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", data={"max_length": 600})
    with pytest.raises(RecipeError, match=r"data.max_length \(600\).*max_position_embeddings \(512\)"):
        train_recipe(path)
    online = {"method": "rl", "data": {"max_length": 500, "eval": None}, "rollout": {"max_new_tokens": 64},
              "rewards": {"function": "prefopt.data.synthetic:sort_scores"}, "ppo": {"advantage": "grpo", "kl_coef": 0}}
    path = write_recipe(tmp_path / "o.yaml", sort_task, tmp_path / "online", **online)
    with pytest.raises(RecipeError, match=r"\(500\) \+ rollout.max_new_tokens 64 = 564.*\(512\)"):
        train_recipe(path)


def test_grpo_with_one_sample_per_prompt_is_refused_whatever_the_scale(sort_task, tmp_path):
    for scale in ("none", "batch", "group"):
        sections = {"method": "rl", "rewards": {"function": "prefopt.data.synthetic:sort_scores"},
                    "rollout": {"samples_per_prompt": 1}, "ppo": {"advantage": "grpo", "advantage_scale": scale}}
        with pytest.raises(RecipeError, match="samples_per_prompt|advantage_scale") as info:
            recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))
        assert "(not grpo)" not in str(info.value)


def test_ctrl_c_during_start_up_is_a_line_not_a_traceback(sort_task, tmp_path, monkeypatch, capsys):
    import prefopt.trainers.preference

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prefopt.trainers.preference, "load_policy", interrupted)
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run")
    assert main(["train", str(path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_signal_while_final_is_written_finishes_it_and_says_so(sort_task, tmp_path, monkeypatch, capsys):
    from prefopt.run import checkpoints

    save_final = checkpoints.save_final

    def signalled(trainer, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # arrives while final/ is being written
        return save_final(trainer, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_final", signalled)
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train={"max_steps": 2})
    assert main(["train", str(path)]) == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert "SIGTERM while final/ is written" in captured.out + captured.err
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert main(["verify", str(tmp_path / "run")]) == 0


def test_a_full_disk_while_the_recipe_is_written_at_start(sort_task, tmp_path, monkeypatch):
    import prefopt.run.checkpoints as checkpoints

    real_open = open

    def no_space(path, mode="r", *args, **kwargs):
        if "w" in mode and ".recipe.yaml." in str(path):
            handle = real_open(path, mode, *args, **kwargs)
            handle.write = lambda *_: (_ for _ in ()).throw(OSError(28, "No space left on device"))
            return handle
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "open", no_space, raising=False)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"writing recipe.yaml and run.json to .* the disk is full"):
        train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock")) == []
