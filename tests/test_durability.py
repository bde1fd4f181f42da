"""Durable checkpoints: pruning that a kill cannot leave half-done, a checkpoint at the last step whatever
save_every says, no silent loss of the RNG state, leftovers of crashed writes cleared, a reference cache that
loads tensors only, and an output_dir checked before anything loads."""

import pickle
import shutil

import pytest
from conftest import read_metrics, write_recipe
from test_runs import Payload

from prefopt.cli import main, train_recipe
from prefopt.run import checkpoints
from prefopt.run.checkpoints import complete_checkpoints


def test_a_kill_while_pruning_never_leaves_a_half_deleted_complete_checkpoint(sort_task, tmp_path, monkeypatch):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                        train={"max_steps": 3, "save_every": 1, "keep_checkpoints": 1})
    real_rmtree = shutil.rmtree

    def killed_midway(target, ignore_errors=False):
        if ignore_errors or not str(target).endswith("step-1"):
            return real_rmtree(target, ignore_errors=ignore_errors)
        next(p for p in target.iterdir() if p.is_file()).unlink()  # one file gone, then the process dies
        raise KeyboardInterrupt("killed while pruning")

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train_recipe(path)
    root = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in complete_checkpoints(root)] == [2] and (root / ".deleting-step-1").is_dir()
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    (root / ".tmp-step-9").mkdir()  # and a write that crashed
    train_recipe(path)
    assert sorted(p.name for p in root.iterdir()) == ["step-3"]  # leftovers cleared at the start
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_the_last_step_is_always_checkpointed_and_a_finished_run_trains_nothing(sort_task, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train={"max_steps": 3, "save_every": 0})
    assert main(["train", str(path)]) == 0
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [3]
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", str(path)]) == 0
    assert "the run had finished: nothing to train" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_a_missing_rng_state_is_never_silent(sort_task, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                        train={"max_steps": 4, "save_every": 2, "keep_checkpoints": None})
    train_recipe(path)
    (tmp_path / "run" / "checkpoints" / "step-4" / "random_states_0.pkl").unlink()
    capsys.readouterr()
    assert main(["train", str(path), "train.max_steps=5"]) == 0
    out = capsys.readouterr().out
    assert "step-4 cannot be loaded" in out and "random_states_0.pkl" in out and "resuming after step 2" in out


def test_a_planted_reference_cache_is_not_run(sort_task, tmp_path, capsys):
    sections = {"reference": {"kind": "precomputed", "cache_dir": str(tmp_path / "cache")}, "train": {"max_steps": 1}}
    train_recipe(write_recipe(tmp_path / "a.yaml", sort_task, tmp_path / "a", **sections))
    marker = tmp_path / "payload-ran"
    for cached in (tmp_path / "cache").glob("*.pt"):
        cached.write_bytes(pickle.dumps(Payload(str(marker))))
    capsys.readouterr()
    train_recipe(write_recipe(tmp_path / "b.yaml", sort_task, tmp_path / "b", **sections))
    assert not marker.exists() and "ignoring the unreadable reference cache" in capsys.readouterr().out


def test_an_output_dir_that_is_a_file_stops_before_anything_loads(sort_task, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "taken")
    assert main(["train", str(path)]) == 2
    assert "output_dir: " in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A 2.6 MB tmpfs: room for the run's files and one checkpoint (1.8 MB), not two."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_names_the_write_and_the_free_space_and_keeps_the_last_checkpoint(sort_task, tmp_path,
                                                                                       small_disk, capsys):
    path = write_recipe(tmp_path / "r.yaml", sort_task, small_disk / "run",
                        train={"max_steps": 3, "save_every": 1, "keep_checkpoints": None})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "writing checkpoint step-2 to" in err and "the disk is full (" in err and "MiB free at" in err
    assert "Traceback" not in err
    root = small_disk / "run" / "checkpoints"
    assert [s for s, _ in complete_checkpoints(root)] == [1] and not list(root.glob(".tmp-*"))


@pytest.mark.parametrize("fault", ["truncated", "deleted"])
def test_a_broken_model_directory_names_the_file(sort_task, tmp_path, capsys, fault):
    model = tmp_path / "model"
    shutil.copytree(sort_task / "model", model)
    weights = model / "model.safetensors"
    if fault == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                                           model={"name_or_path": str(model)}))]) == 2
    err = capsys.readouterr().err
    assert ("model.safetensors cannot be read (truncated or corrupt" if fault == "truncated"
            else "holds no weights (model.safetensors, or pytorch_model.bin)") in err


def test_invalid_utf8_names_the_file_and_line(sort_task, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    lines = (sort_task / "train.jsonl").read_bytes().splitlines(keepends=True)[:20]
    lines[6] = lines[6].replace(b"sort", b"s\xffrt")
    data.write_bytes(b"".join(lines))
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", data={"train": str(data), "eval": None})
    assert main(["train", str(path)]) == 2
    assert "pairs.jsonl line 7 is not valid UTF-8 (byte 13 of the line)" in capsys.readouterr().err


def test_a_read_only_output_dir_stops_before_anything_loads(sort_task, tmp_path, capsys):
    import subprocess

    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        path = write_recipe(tmp_path / "r.yaml", sort_task, mount / "run")
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"output_dir: cannot write to {mount / 'run'} (Read-only file system)" in err
        assert "Loading weights" not in err  # before any model loads
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
