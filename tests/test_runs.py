"""Runs that cannot be mixed up or lost: the recipe names its method, resume refuses a changed recipe, default
output directories are per recipe, stop signals checkpoint, a lock keeps a second run out, and a checkpoint that
cannot be read (or holds a planted pickle) is passed over without running anything."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
from conftest import read_metrics, write_recipe
from test_ppo import ppo_sections

import prefopt
from prefopt import recipe as recipe_lib
from prefopt.cli import main, train_recipe
from prefopt.errors import RecipeError
from prefopt.run.checkpoints import complete_checkpoints

SHORT = {"train": {"max_steps": 4, "save_every": 2, "keep_checkpoints": None}}


def snapshot(directory):
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


def test_a_changed_recipe_does_not_resume_another_run(sort_task, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **SHORT)
    train_recipe(path)
    before = snapshot(tmp_path / "run")
    assert main(["train", str(path), "loss.name=ipo", "optim.weight_decay=0.1", "train.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another recipe" in err and "loss.name: 'dpo' -> 'ipo'" in err
    changed = err.split("Changed:")[1].split("A resume may change only")[0]
    assert "optim.weight_decay: 0.0 -> 0.1" in changed and "train.max_steps" not in changed
    assert "--restart" in err
    assert snapshot(tmp_path / "run") == before  # nothing written
    train_recipe(path, ["train.max_steps=6"])  # more steps of the same recipe: resumes
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["prefopt"] == prefopt.__version__ and info["started"] <= info["ended"]
    assert info["recipe_fingerprint"] and "prefopt_commit" in info
    assert main(["train", str(path), "loss.name=ipo", "--restart"]) == 0  # archived, then a fresh run
    archived = list((tmp_path / "run" / "archive").iterdir())
    assert len(archived) == 1 and complete_checkpoints(archived[0] / "checkpoints")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_default_output_dirs_are_per_recipe(sort_task, tmp_path):
    data = {"model": {"name_or_path": str(sort_task / "model")}, "data": {"train": str(sort_task / "train.jsonl")}}
    (tmp_path / "a.yaml").write_text(json.dumps(data))
    (tmp_path / "b.yaml").write_text(json.dumps({**data, "loss": {"name": "ipo"}}))
    a, b = recipe_lib.load(tmp_path / "a.yaml"), recipe_lib.load(tmp_path / "b.yaml")
    assert a.output_dir.startswith("runs/a-") and b.output_dir.startswith("runs/b-") and a.output_dir != b.output_dir
    assert recipe_lib.load(tmp_path / "a.yaml", ["train.max_steps=7"]).output_dir == a.output_dir  # resumable
    assert recipe_lib.from_dict(data).output_dir != recipe_lib.from_dict({**data, "seed": 1}).output_dir


def test_resume_false_leaves_nothing_resumable(sort_task, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **SHORT)
    train_recipe(path)
    train_recipe(path, ["train.resume=false", "train.max_steps=2", "train.save_every=0"])
    # the old checkpoints archived; the new run ends with its own at its last step
    assert complete_checkpoints(tmp_path / "run" / "checkpoints") == [(2, tmp_path / "run/checkpoints/step-2")]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    (old,) = (tmp_path / "run" / "archive").iterdir()
    assert [s for s, _ in complete_checkpoints(old / "checkpoints")] == [2, 4]


@pytest.mark.parametrize("sections,message", [
    ({**ppo_sections(advantage="grpo"), "loss": {"name": "dpo"}}, r"loss: is not a section of method 'rl'"),
    ({"rollout": {"samples_per_prompt": 2}, "method": "preference"},
     r"rollout: is not a section of method 'preference'"),
    ({"method": "reward"}, r"method 'reward' trains a reward model"),
    ({"loss": {"name": "bradley_terry"}, "method": "preference"}, r"add the line `method: reward`"),
])
def test_sections_belong_to_their_method(sort_task, tmp_path, sections, message):
    with pytest.raises(RecipeError, match=message):
        recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))


def test_saved_recipes_hold_only_their_method(sort_task, tmp_path):
    ppo = recipe_lib.load(write_recipe(tmp_path / "p.yaml", sort_task, tmp_path / "p", **ppo_sections()))
    assert ppo.method == "rl" and "loss" not in ppo.to_dict() and "ppo" in ppo.to_dict()
    dpo = recipe_lib.load(write_recipe(tmp_path / "d.yaml", sort_task, tmp_path / "d"))
    assert dpo.method == "preference" and not {"ppo", "rollout", "rewards"} & set(dpo.to_dict())


def test_a_user_trainer_runs_from_the_recipe(sort_task, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", trainer="test_runs:CountingTrainer",
                        train={"max_steps": 2})
    train_recipe(path)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert CountingTrainer.calls > 0
    with pytest.raises(RecipeError, match="is not a subclass of PreferenceTrainer"):
        train_recipe(path, ["trainer=test_runs:snapshot", f"output_dir={tmp_path / 'other'}"])


from prefopt.trainers import PreferenceTrainer  # noqa: E402


class CountingTrainer(PreferenceTrainer):
    calls = 0

    def compute_loss(self, batch):
        CountingTrainer.calls += 1
        return super().compute_loss(batch)


def test_a_live_run_holds_its_directory_and_a_stale_lock_is_taken_over(sort_task, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train={"max_steps": 1})
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "now"}
        (tmp_path / "run" / ".lock").write_text(json.dumps(lock))
        assert main(["train", str(path)]) == 2
        assert f"being written by a live run (process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", str(path)]) == 0  # its process is gone: the lock is taken over
    assert not (tmp_path / "run" / ".lock").exists()


def test_sigterm_checkpoints_and_the_rerun_continues_exactly(sort_task, tmp_path):
    steps = 30
    sections = {"train": {"max_steps": steps, "save_every": 10, "eval_every": 10},
                "optim": {"schedule": "constant", "warmup_steps": 0}}
    train_recipe(write_recipe(tmp_path / "whole.yaml", sort_task, tmp_path / "whole", **sections))
    out = tmp_path / "stopped"
    path = write_recipe(tmp_path / "stopped.yaml", sort_task, out, **sections)
    proc = subprocess.Popen([sys.executable, "-m", "prefopt", "train", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    start = time.time()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    err = proc.stderr.read().decode()
    assert time.time() - start < 30 and "stopped by SIGTERM after step" in err
    (stopped_at, _), *_ = reversed(complete_checkpoints(out / "checkpoints"))
    assert 3 <= stopped_at < steps
    train_recipe(path)
    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    assert [r["loss"] for r in resumed[stopped_at:]] == pytest.approx([r["loss"] for r in whole[stopped_at:]],
                                                                      abs=1e-6)


class Payload:
    """Unpickling this writes a marker file: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fault", ["truncated_state", "deleted_optimizer", "empty_trainer_state", "pickles"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(sort_task, tmp_path, fault, capsys):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **SHORT)
    train_recipe(path)
    newest = tmp_path / "run" / "checkpoints" / "step-4"
    marker = tmp_path / "payload-ran"
    if fault == "truncated_state":
        state = newest / "prefopt_state.json"
        state.write_text(state.read_text()[:10])
    elif fault == "deleted_optimizer":
        (newest / "optimizer.bin").unlink()
    elif fault == "empty_trainer_state":
        (newest / "trainer_state.json").write_text("")
    else:  # a payload in every file of the checkpoint, and one Accelerate would load with weights_only=False
        for file in [*newest.iterdir(), newest / "custom_checkpoint_0.pkl"]:
            if file.name != "trainer_state.json":
                file.write_bytes(pickle.dumps(Payload(str(marker))))
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tr')  # and a torn last line, as a full disk leaves
    assert main(["train", str(path), "train.max_steps=6"]) == 0
    assert not marker.exists()
    err = capsys.readouterr().out
    if fault != "empty_trainer_state":  # an empty state makes step-4 incomplete: it is not even tried
        assert "step-4 cannot be loaded" in err and "falling back to the previous one" in err
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
