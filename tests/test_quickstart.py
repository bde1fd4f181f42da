"""The quickstart recipe, exactly as `make quickstart` runs it, learns the sorting task."""

import json
import math
from pathlib import Path

from conftest import read_metrics

from prefopt.cli import main
from prefopt.data.synthetic import write_sort_task

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_quickstart_learns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the quickstart writes runs/ under the working directory
    assert main(["quickstart", "train.progress_bar=false"]) == 0
    evals = read_metrics(tmp_path / "runs" / "quickstart", "eval")
    first, last = evals[0], evals[-1]
    assert (first["step"], last["step"]) == (0, 200)
    assert first["rewards/accuracy"] == 0.5 and abs(first["loss"] - math.log(2)) < 1e-5
    assert last["rewards/accuracy"] >= 0.9
    out = capsys.readouterr().out
    assert "eval metric" in out and "rewards/accuracy" in out and "step 200" in out
    assert "greedy samples, step 0 -> step 200:" in out and "samples/sort_scores" in out
    samples = [json.loads(line) for line in (tmp_path / "runs" / "quickstart" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0] * 3 + [50] * 3 + [100] * 3 + [150] * 3 + [200] * 3
    for sample in samples[-3:]:  # the printed rows are the logged ones
        assert f"step 200: {sample['completion']!r} (sort_scores {sample['sort_scores']:g})" in out


def test_reward_quickstart_reaches_95_percent_held_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_sort_task("runs/quickstart-assets")
    assert main(["train", str(RECIPES / "reward" / "quickstart.yaml"), "train.progress_bar=false"]) == 0
    assert main(["eval", "runs/reward", "--data", "runs/quickstart-assets/eval.jsonl", "--out", "report.json"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pairs"] == 200 and report["rewards/accuracy"] >= 0.95
    assert read_metrics(tmp_path / "runs" / "reward", "eval")[0]["rewards/accuracy"] < 0.7  # it was learnt
