"""A checkpoint proves itself: bit rot in any file of a checkpoint (its header intact, its payload changed) is named
and the run falls back to the checkpoint before it; a missing, empty or corrupt state file is said; `prefopt
verify` checks a run offline; a data file or model rewritten at the same path refuses to resume."""

import json
import shutil

import pytest
from conftest import read_metrics, write_recipe

from prefopt.cli import main, train_recipe
from prefopt.errors import RecipeError
from prefopt.run.checkpoints import STATE_FILE, verify


def flip(path, offset_fraction: float = 0.5) -> None:
    """Change bytes in the middle of a file, keeping its length and its first bytes (a header) as they are."""
    data = bytearray(path.read_bytes())
    at = max(1, int(len(data) * offset_fraction))
    for i in range(at, min(at + 4, len(data))):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def run(sort_task, tmp_path_factory):
    """DPO, 4 steps, a checkpoint at 2 and at 4 (constant schedule: resuming from 2 retrains 3 and 4 alike)."""
    root = tmp_path_factory.mktemp("integrity")
    sections = {"optim": {"schedule": "constant", "warmup_steps": 0, "lr": 1e-2},
                "train": {"max_steps": 4, "save_every": 2}}
    out = root / "run"
    train_recipe(write_recipe(root / "r.yaml", sort_task, out, **sections))
    return root, out


def test_every_file_of_a_checkpoint_is_checked(run, tmp_path):
    _, out = run
    step = out / "checkpoints" / "step-4"
    files = sorted(p.relative_to(step) for p in step.rglob("*") if p.is_file() and p.name != STATE_FILE)
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "prefopt_state.json"} <= {str(f) for f in files}
    assert verify(step) == []
    for name in files:  # one flip at a time, in a copy
        copy = tmp_path / str(name).replace("/", "_")
        shutil.copytree(step, copy)
        flip(copy / name)
        assert verify(copy) == [f"{name} does not match its checksum"], name
        (copy / name).unlink()
        assert verify(copy) == [f"{name} is missing"], name


def test_bit_rot_falls_back_to_the_previous_checkpoint_and_resumes_exactly(run, sort_task, tmp_path, capsys):
    _, out = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "final")
    flip(copy / "checkpoints" / "step-4" / "optimizer.bin")
    assert main(["verify", str(copy)]) == 1
    report = capsys.readouterr().out
    assert "BAD" in report and "step-4: optimizer.bin does not match its checksum" in report and "ok   " in report
    sections = {"optim": {"schedule": "constant", "warmup_steps": 0, "lr": 1e-2},
                "train": {"max_steps": 4, "save_every": 2}}
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, copy, **sections))
    printed = capsys.readouterr().out
    assert "step-4 cannot be loaded (optimizer.bin does not match its checksum); falling back" in printed
    assert "resuming after step 2" in printed
    assert [r["loss"] for r in read_metrics(copy)] == pytest.approx([r["loss"] for r in read_metrics(out)], abs=1e-6)


@pytest.mark.parametrize("state", ["missing", "empty", "unreadable"])
def test_a_bad_state_file_is_said(run, sort_task, tmp_path, capsys, state):
    _, out = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    path = copy / "checkpoints" / "step-4" / STATE_FILE
    if state == "missing":
        path.unlink()
    else:
        path.write_text("" if state == "empty" else '{"step": 4, "files": ')
    sections = {"optim": {"schedule": "constant", "warmup_steps": 0, "lr": 1e-2},
                "train": {"max_steps": 4, "save_every": 2}}
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, copy, **sections))
    assert f"step-4 is not a complete checkpoint (its {STATE_FILE} is {state}); skipped" in capsys.readouterr().out


def test_final_is_checked_too(run, tmp_path, capsys):
    _, out = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    assert main(["verify", str(copy)]) == 0
    assert "every checkpoint and final/ match" in capsys.readouterr().out
    flip(copy / "final" / "model.safetensors")
    assert main(["verify", str(copy)]) == 1
    assert "final: model.safetensors does not match its checksum" in capsys.readouterr().out


def test_a_data_file_or_model_rewritten_at_the_same_path_refuses_to_resume(sort_task, tmp_path):
    task = tmp_path / "task"
    shutil.copytree(sort_task, task)
    sections = {"train": {"max_steps": 2, "save_every": 2}}
    path = write_recipe(tmp_path / "r.yaml", task, tmp_path / "run", **sections)
    train_recipe(path, ["train.max_steps=2"])
    (task / "train.jsonl").touch()  # a new mtime, the same content: resumes
    train_recipe(path, ["train.max_steps=3", "train.save_every=3"])
    lines = (task / "train.jsonl").read_text().splitlines()
    (task / "train.jsonl").write_text("\n".join([json.dumps({**json.loads(lines[1]), "chosen": " 1"}), *lines[1:]]))
    with pytest.raises(RecipeError, match=r"read other inputs.*train.jsonl \(data.train\) was rewritten"):
        train_recipe(path, ["train.max_steps=4"])
    (task / "train.jsonl").write_text("\n".join(lines) + "\n")
    config = json.loads((task / "model" / "config.json").read_text())
    (task / "model" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(RecipeError, match=r"config.json \(model.name_or_path\) was rewritten"):
        train_recipe(path, ["train.max_steps=4"])


def test_the_documented_remedy_of_a_non_finite_stop_resumes_and_is_recorded(sort_task, tmp_path, capsys):
    """Lower optim.lr and train.max_grad_norm, then resume: accepted, applied from the next step, in run.json."""
    sections = {"optim": {"schedule": "constant", "warmup_steps": 0, "lr": 1e-2}, "train": {"save_every": 2}}
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections)
    train_recipe(path, ["train.max_steps=2"])
    train_recipe(path, ["train.max_steps=4", "optim.lr=0.001", "train.max_grad_norm=0.5"])
    assert "changed on resume: optim.lr 0.01 -> 0.001, train.max_grad_norm 1.0 -> 0.5" in capsys.readouterr().out
    assert [r["lr"] for r in read_metrics(tmp_path / "run")] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["changed_on_resume"] == [{"step": 2, "optim.lr": [0.01, 0.001], "train.max_grad_norm": [1.0, 0.5]}]
