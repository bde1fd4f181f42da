"""What a new user coming from TRL met on the way: shipped recipes by name, module:function from the current
directory, a loss switched by override, a missing model directory, prefopt env."""

import pytest
from conftest import write_recipe

from prefopt import recipe as recipe_lib
from prefopt.cli import main
from prefopt.errors import RecipeError


def test_a_shipped_recipe_is_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here, as for a wheel user
    assert recipe_lib.load("quickstart").data.max_length == recipe_lib.load(recipe_lib.SHIPPED / "quickstart.yaml").data.max_length
    assert recipe_lib.load("dpo/qwen2.5-0.5b").model.name_or_path.startswith("Qwen/")
    with pytest.raises(RecipeError, match="recipe file not found: nope"):
        recipe_lib.load("nope")


def test_module_function_is_found_in_the_current_directory(sort_task, tmp_path, monkeypatch):
    import sys

    (tmp_path / "my_rewards_here.py").write_text("def score(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    from prefopt.errors import import_object

    assert import_object("my_rewards_here:score", "rewards[0].function")(completions=["a"]) == [1.0]


def test_switching_the_loss_by_override_drops_the_old_losss_arguments(sort_task, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", loss={"name": "dpo", "beta": 0.1,
                                                                                "label_smoothing": 0.1})
    recipe = recipe_lib.load(path, ["loss.name=sft"])
    assert recipe.loss[0].name == "sft" and recipe.loss[0].params == {}
    assert "loss.name=sft: dropped beta, label_smoothing (arguments of dpo that sft does not take)" in capsys.readouterr().out
    assert recipe_lib.load(path, ["loss.name=ipo"]).loss[0].params == {"beta": 0.1}  # ipo takes beta
    with pytest.raises(RecipeError, match="has no argument 'label_smoothing'"):  # written by the user: an error
        recipe_lib.load(path, ["loss.name=sft", "loss.label_smoothing=0.1"])


def test_a_missing_model_directory_says_so(sort_task, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", model={"name_or_path": "./models/typo"})
    assert main(["train", str(path)]) == 2
    from prefopt.trainers import PreferenceTrainer

    with pytest.raises(RecipeError, match=r"model.name_or_path: no such directory: ./models/typo \(relative paths"):
        PreferenceTrainer(recipe_lib.load(path))


def test_prefopt_env_prints_what_a_bug_report_needs(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("prefopt:", "torch:", "transformers:", "accelerate:", "trl:", "cuda:", "torch threads:",
                "OMP_NUM_THREADS:", "accelerate default config:"):
        assert key in out, key


def test_cpu_threads_follow_the_cores_and_processes_unless_set(monkeypatch):
    import os

    import torch

    from prefopt.distributed import cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        cores = len(os.sched_getaffinity(0))
        assert f"torch threads per process: {max(1, cores // 2)} ({cores} cores / 2 process(es)" in cpu_threads(True)
        assert torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert cpu_threads(True) is None and cpu_threads(False) is None
    finally:
        torch.set_num_threads(before)


def test_the_chain_tasks_rows_and_verifiers():
    """Multi-step addition shows each running sum; chain_correct reads the last number, sum_correct the first
    number against the prompt's own sum."""
    import random

    from prefopt.data.synthetic import chain_correct, chain_row, sum_correct

    row = chain_row(random.Random(3))
    values = [int(v) for v in row["prompt"].removeprefix("add: ").removesuffix(" =").split(" + ")]
    sums = [sum(values[: i + 1]) for i in range(1, len(values))]
    assert row["work"] == " " + " ".join(map(str, sums)) and row["answer"] == str(sum(values))
    assert chain_correct([row["work"], " 1 2 999"], [row["answer"]] * 2) == [1.0, 0.0]
    assert sum_correct(["add: 13 + 6 =", "add: 1 + 2 =", "add: 4 + 4 ="], [" 19", " 4", ""]) == [1.0, 0.0, 0.0]
