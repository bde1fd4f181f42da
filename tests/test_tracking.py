"""Seeing a run: trackers fed from the same records as metrics.jsonl, console lines, samples, plots, diagnostics
and model cards."""

import json
import math
import re

import pytest
import torch
from conftest import read_metrics, write_recipe

from prefopt.cli import main, train_recipe
from prefopt.diagnostics import pair_diagnostics
from prefopt.errors import PrefoptError, RecipeError
from prefopt.run.metrics import MetricMeans


class Sum:  # MetricMeans.result's reduction, on one process
    def reduce(self, tensor, reduction):
        return tensor


def test_trackers_receive_every_record_of_metrics_jsonl(sort_task, tmp_path, monkeypatch, capsys):
    """TensorBoard's event files (read back with its EventAccumulator), the MLflow file store and trackio's local
    store hold the same loss series as metrics.jsonl; W&B writes its offline run; samples reach samples.jsonl; one
    console line per eval; the summary at the end."""
    import sys

    import trackio  # noqa: F401  (its modules copy TRACKIO_DIR when they load, perhaps before this test)
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    for name, module in list(sys.modules.items()):
        if (name == "trackio" or name.startswith("trackio.")) and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out,
                              log={"to": ["tensorboard", "mlflow", "wandb", "trackio"], "project": "tracked"},
                              train={"max_steps": 4, "eval_every": 2},
                              eval={"generate": 2, "max_new_tokens": 6,
                                    "rewards": [{"function": "prefopt.data.synthetic:sort_scores"}]}))
    printed = capsys.readouterr().out
    train, evals = read_metrics(out, timing=True), read_metrics(out, "eval", timing=True)
    assert [r["step"] for r in evals] == [0, 2, 4]

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    for split, records in (("train", train), ("eval", evals)):
        scalars = events.Scalars(f"{split}/loss")
        assert [s.step for s in scalars] == [r["step"] for r in records]
        assert [s.value for s in scalars] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert "samples/text_summary" in events.Tags()["tensors"]  # the sample table, as text

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    history = client.get_metric_history(run.info.run_id, "eval/diag/policy_ranking_accuracy")
    assert [(m.step, m.value) for m in history] == [
        (r["step"], pytest.approx(r["diag/policy_ranking_accuracy"], rel=1e-6)) for r in evals]
    assert run.data.params["loss.beta"] == "0.1"  # the resolved recipe is the run's config
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_runs("tracked") == ["run"]
    logged = SQLiteStorage.get_logs("tracked", "run")
    for split, records in (("train", train), ("eval", evals)):
        series = [(r["step"], r[f"{split}/loss"]) for r in logged if f"{split}/loss" in r]
        assert series == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 2, 2, 4, 4]
    assert set(samples[0]) == {"step", "prompt", "completion", "chosen", "sort_scores"}
    assert samples[0]["prompt"].startswith("sort:") and samples[0]["sort_scores"] in (0.0, 1.0)
    for step in (0, 2, 4):  # the eval record holds the samples' mean score
        mean = sum(s["sort_scores"] for s in samples if s["step"] == step) / 2
        assert next(r for r in evals if r["step"] == step)["samples/sort_scores"] == mean

    eval_lines = [line for line in printed.splitlines() if line.startswith("[prefopt] eval step")]
    assert len(eval_lines) == 3 and "rewards/accuracy" in eval_lines[-1]
    assert re.search(r"\[prefopt\] done: 4 steps in [\d.]+ s, [\d,]+ tokens/s", printed)


def test_a_run_without_eval_data_ends_with_a_summary(sort_task, tmp_path, capsys):
    out = tmp_path / "run"
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, data={"eval": None}, train={"max_steps": 2}))
    printed = capsys.readouterr().out
    assert "[prefopt] eval step" not in printed
    assert "[prefopt] done: 2 steps" in printed
    assert f"[prefopt] last train (step 2): loss {read_metrics(out)[-1]['loss']:.4f}" in printed
    assert f"outputs in {out}: metrics.jsonl, final" in printed
    # with the progress bar off, each logged train record is a line too
    assert printed.count("[prefopt] train step") == 2


def test_tracker_errors_name_the_fix(sort_task, tmp_path, monkeypatch):
    from prefopt import recipe as recipe_lib
    from prefopt.run import tracking

    with pytest.raises(RecipeError, match="unknown tracker 'tensorbord'; known: .*tensorboard"):
        recipe_lib.load(write_recipe(tmp_path / "a.yaml", sort_task, tmp_path / "a", log={"to": ["tensorbord"]}))
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RecipeError, match=r"log.to names aim, which is not installed here: pip install 'prefopt\[aim\]'"):
        tracking.check_trackers(["aim"])


def test_diagnostics_on_a_constructed_case():
    """Four pairs whose chosen log-probs all fall below the reference's while the margin grows (likelihood
    displacement): chosen_logp_fell is 1; the policy ranks 2 of 4 pairs right on its own likelihoods while the
    reference ranked 3; the length-margin correlation is Pearson's, worked out by hand."""
    ref_chosen, ref_rejected = torch.tensor([-10.0, -12.0, -8.0, -20.0]), torch.tensor([-11.0, -12.0, -9.0, -18.0])
    chosen, rejected = ref_chosen - torch.tensor([1.0, 2.0, 0.5, 1.0]), ref_rejected - torch.tensor([3.0, 1.0, 5.0, 0.5])
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)  # beta 1: [2, -1, 4.5, -0.5]
    lengths = torch.tensor([1.0, 0.0, 2.0, 1.0])
    means = MetricMeans()
    for key, value in pair_diagnostics(chosen, rejected, ref_chosen, ref_rejected, margin, lengths).items():
        means.add(key, value)
    record = means.result(Sum())
    assert record["diag/chosen_logp_fell"] == 1.0
    assert record["diag/chosen_logp_change"] == pytest.approx(-1.125)
    assert record["diag/rejected_logp_change"] == pytest.approx(-2.375)
    # policy: -11 > -14 yes, -14 > -13 no, -8.5 > -14 yes, -21 > -18.5 no; reference: yes, tie (half), yes, no
    assert record["diag/policy_ranking_accuracy"] == 0.5
    assert record["diag/reference_ranking_accuracy"] == 0.625
    # x = [1, 0, 2, 1] - 1 = [0, -1, 1, 0]; y = [2, -1, 4.5, -0.5] - 1.25 = [0.75, -2.25, 3.25, -1.75]:
    # cov (2.25 + 3.25) / 4 = 1.375, var x 2 / 4 = 0.5, var y 19.25 / 4 = 4.8125
    assert record["diag/length_margin_corr"] == pytest.approx(1.375 / math.sqrt(0.5 * 4.8125))
    assert not any(key.startswith("corr:") for key in record)
    # no reference (a reference-free loss): the policy's own ranking only
    assert set(pair_diagnostics(chosen, rejected, None, None, margin, lengths)) == {
        "diag/policy_ranking_accuracy", "corr:diag/length_margin_corr"}


def test_diagnostics_in_a_dpo_run(sort_task, tmp_path):
    """At step 0 the policy is its reference: nothing changed, nothing fell, both rank alike; DPO then moves
    the chosen log-probs above the reference's."""
    out = tmp_path / "run"
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, train={"max_steps": 6}))
    first, last = read_metrics(out, "eval")
    assert first["diag/chosen_logp_change"] == 0 and first["diag/chosen_logp_fell"] == 0
    assert first["diag/policy_ranking_accuracy"] == first["diag/reference_ranking_accuracy"]
    assert last["diag/reference_ranking_accuracy"] == first["diag/reference_ranking_accuracy"]
    assert last["diag/chosen_logp_change"] - last["diag/rejected_logp_change"] == pytest.approx(
        last["rewards/margin"] / 0.1, rel=1e-4)  # DPO's margin is beta times the change gap


def test_plot_overlays_runs(sort_task, tmp_path):
    from prefopt.plotting import plot_runs

    runs = []
    for lr in (1e-3, 1e-2):
        out = tmp_path / f"lr{lr}"
        train_recipe(write_recipe(tmp_path / f"{lr}.yaml", sort_task, out, optim={"lr": lr},
                                  train={"max_steps": 4, "eval_every": 2}))
        runs.append(out)
    assert main(["plot", *map(str, runs), "-o", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 10_000
    fig = plot_runs(runs)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles[:5] == ["loss", "reward margin", "ranking accuracy", "log-probs", "log-prob change vs reference"]
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    for run in runs:
        for split in ("train", "eval"):
            records = read_metrics(run, split)
            line = lines[f"{run.name} {split}/loss"]
            assert list(line.get_xdata()) == [r["step"] for r in records]
            assert list(line.get_ydata()) == pytest.approx([r["loss"] for r in records])
        assert f"{run.name} eval/diag/policy_ranking_accuracy" in lines
    fig = plot_runs(runs[:1], metrics=["lr"])
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["lr"]
    with pytest.raises(PrefoptError, match="none of the metrics"):
        plot_runs(runs[:1], metrics=["nope"])


def length_score(prompts, completions):
    return [len(c) / 10 for c in completions]


CARD_RUNS = {
    "dpo": {},
    "lora": {"model": {"lora": {"r": 4, "alpha": 8}}},
    "reward": {"loss": {"name": "bradley_terry"}},
    "grpo": {"method": "rl", "data": {"eval": None}, "rewards": {"function": "test_tracking:length_score"},
             "rollout": {"samples_per_prompt": 2, "max_new_tokens": 4}, "ppo": {"advantage": "grpo"}},
}


@pytest.mark.parametrize("kind", CARD_RUNS)
def test_model_card_load_snippet_runs(sort_task, tmp_path, kind, monkeypatch):
    out = tmp_path / kind
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, out, **CARD_RUNS[kind], train={"max_steps": 2}))
    card = (out / "final" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: ") and f"base_model: {sort_task / 'model'}" in card
    assert "## Recipe" in card and "## Versions" in card and "- torch " in card
    assert ("## Last evaluation" in card) == (kind != "grpo")
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "prefopt" not in snippet
    namespace = {}
    exec(snippet, namespace)  # loads final/ with transformers or peft alone, and uses it
    model = namespace["model"]
    assert type(model).__name__ == {"dpo": "LlamaForCausalLM", "lora": "PeftModelForCausalLM",
                                    "reward": "LlamaForSequenceClassification", "grpo": "LlamaForCausalLM"}[kind]

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id, folder_path))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert main(["push", str(out), "me/model"]) == 0
    assert calls == [("create", "me/model", False), ("upload", "me/model", str(out / "final"))]
    assert main(["push", str(tmp_path), "me/model"]) == 2  # no final/: a clear error


def test_a_multi_run_plot_gives_each_run_one_colour_and_one_legend(sort_task, tmp_path):
    """Several runs: a run keeps its colour in every panel, the figure names the runs once, and a panel with
    several metrics tells them apart by marker in its own legend."""
    from prefopt.plotting import plot_runs

    runs = []
    for lr in (1e-3, 1e-2):
        runs.append(tmp_path / f"lr{lr}")
        train_recipe(write_recipe(tmp_path / f"{lr}.yaml", sort_task, runs[-1], optim={"lr": lr},
                                  train={"max_steps": 2, "eval_every": 1}))
    fig = plot_runs(runs)
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if " " in str(line.get_label()) and not str(line.get_label()).startswith("_"):
                colours.setdefault(line.get_label().split(" ")[0], set()).add(line.get_color())
    assert set(colours) == {"lr0.001", "lr0.01"} and all(len(c) == 1 for c in colours.values())
    assert colours["lr0.001"] != colours["lr0.01"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["lr0.001", "lr0.01", "train", "eval"]
    log_probs = next(ax for ax in fig.axes if ax.get_title() == "log-probs")
    assert [t.get_text() for t in log_probs.get_legend().get_texts()] == ["logps/chosen", "logps/rejected"]
