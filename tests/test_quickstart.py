"""The quickstart recipe, exactly as `make quickstart` runs it, learns the sorting task."""

import math

from conftest import read_metrics

from prefopt.cli import main


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
