"""Shared fixtures: one tiny model, tokenizer and sorting data set for the whole session.

Everything is built locally (nothing comes from the hub) and loaded back through
from_pretrained, the same code path a user's hub model takes.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402


@pytest.fixture(scope="session")
def sort_task(tmp_path_factory) -> Path:
    from prefopt.data.synthetic import write_sort_task

    return write_sort_task(tmp_path_factory.mktemp("sort"), n_train=256, n_eval=48)


@pytest.fixture(scope="session")
def tokenizer(sort_task):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sort_task / "model")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; forget the previous one's singletons."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def write_recipe(path: Path, sort_task: Path, output_dir: Path, **sections) -> Path:
    """A small DPO recipe on the session's sorting task; `sections` update its sections (and replace `loss`)."""
    recipe = {
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"name_or_path": str(sort_task / "model")},
        "data": {"train": str(sort_task / "train.jsonl"), "eval": str(sort_task / "eval.jsonl"),
                 "max_length": 48, "max_prompt_length": 24},
        "loss": {"name": "dpo", "beta": 0.1},
        "optim": {"lr": 1.0e-3, "schedule": "cosine", "warmup_steps": 1},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 5, "eval_every": 0, "save_every": 0,
                  "progress_bar": False},
    }
    if "ppo" in sections or sections.get("method") in ("rl", "distill"):  # methods without a loss: section
        del recipe["loss"]
    for key, value in sections.items():
        if isinstance(value, dict) and key != "loss":  # a loss block replaces the default one
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


TIMING = ("step_seconds", "tokens_per_second", "rollout/tokens_per_second")  # wall-clock: differs between any two runs


def read_metrics(output_dir: Path, split: str = "train", timing: bool = False) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if timing or not (k in TIMING or k.startswith("timing/"))}
            for r in map(json.loads, lines) if r["split"] == split]


def stop_and_continue(whole: Path, resumed: Path) -> tuple[list[dict], list[dict]]:
    """The recipe `whole` (4 steps, a checkpoint every 2) straight, and `resumed` (the same run in another
    output_dir) stopped after 2 steps and continued to 4: both runs' train records."""
    from prefopt.cli import train_recipe

    train_recipe(whole)
    train_recipe(resumed, ["train.max_steps=2"])
    train_recipe(resumed)
    a, b = (read_metrics(Path(yaml.safe_load(path.read_text())["output_dir"])) for path in (whole, resumed))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    return a, b


def assert_same_records(a: list[dict], b: list[dict], tolerance: float = 1e-6) -> None:
    """Every metric of every record equal (timing aside)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], abs=tolerance) for k in x), x["step"]


def assert_resume_matches(sort_task: Path, tmp_path: Path, **sections) -> None:
    """4 steps straight, against 2 steps then the same recipe continued to 4 from the step-2 checkpoint:
    the same losses (constant schedule, so that stopping at 2 changes nothing before the resume)."""
    sections = {"optim": {"schedule": "constant", "warmup_steps": 0, "lr": 1e-2}, **sections}
    sections["train"] = {"max_steps": 4, "save_every": 2, **sections.get("train", {})}
    whole, resumed = stop_and_continue(write_recipe(tmp_path / "a.yaml", sort_task, tmp_path / "a", **sections),
                                       write_recipe(tmp_path / "b.yaml", sort_task, tmp_path / "b", **sections))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], abs=1e-6)
