"""data.streaming: rows read from shards as training goes, in a seeded order, resumed from the checkpointed
position; bad rows and unreadable shards stop the run (naming them, keeping what was trained) or are dropped."""

import json
from pathlib import Path

import pytest
from conftest import read_metrics, write_recipe

from prefopt.cli import main, train_recipe
from prefopt.data.stream import Stream, StreamStop
from prefopt.errors import DataError
from prefopt.recipe import DataConfig, DataSource


def write_shards(sort_task: Path, out: Path, sizes=(90, 90, 76), bad: dict | None = None) -> str:
    """The sort task's training rows cut into jsonl shards part-0.jsonl, ...; `bad`: {(shard, line): text} put
    in place of those lines. Returns the glob naming them."""
    lines = (sort_task / "train.jsonl").read_text().splitlines()
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, size in enumerate(sizes):
        part = lines[start : start + size]
        for (shard, line), text in (bad or {}).items():
            if shard == i:
                part[line - 1] = text
        (out / f"part-{i}.jsonl").write_text("\n".join(part) + "\n")
        start += size
    return str(out / "part-*.jsonl")


def stream(tokenizer, train: str, world=(0, 1), **data) -> Stream:
    cfg = DataConfig(train=[DataSource(train)], max_length=48, max_prompt_length=24, streaming=True,
                     **{"shuffle_buffer": 16, **data})
    return Stream(cfg.train, tokenizer, cfg, 0, "data.train", "any", *world, log=lambda _: None)


def prompts(batch: list[dict]) -> list[tuple]:
    return [tuple(ex["prompt_ids"]) + tuple(ex.get("chosen_ids", ex.get("completion_ids"))) for ex in batch]


def test_each_epoch_reads_every_row_once_in_an_order_drawn_from_the_seed(sort_task, tokenizer, tmp_path):
    train = write_shards(sort_task, tmp_path / "shards")
    rows = 256
    source = stream(tokenizer, train)
    read = [row for step in range(1, 2 * rows // 8 + 1) for row in prompts(source.batch(step, 8))]
    first, second = read[:rows], read[rows:]
    assert sorted(first) == sorted(second) == every_row(tokenizer, [train])  # every row once per epoch
    assert first != second  # shards and blocks reshuffled each epoch
    assert first != prompts(list(load_examples_in_order(tokenizer, train)))  # and not the files' order
    assert source.stats()["data/epoch"] == 1.0  # the last row's, from 0
    again = stream(tokenizer, train)
    assert [row for step in range(1, 11) for row in prompts(again.batch(step, 8))] == read[:80]
    at_the_end = stream(tokenizer, train)  # resumed where the first epoch ends
    at_the_end.load_state_dict(state_after(tokenizer, train, rows // 8, size=8))
    assert [row for step in range(rows // 8 + 1, 2 * rows // 8 + 1) for row in prompts(at_the_end.batch(step, 8))] \
        == second
    source.close(), again.close(), at_the_end.close()


def load_examples_in_order(tokenizer, train):
    from prefopt.data import load_examples

    return load_examples([DataSource(train)], tokenizer, DataConfig(train=[], max_length=48, max_prompt_length=24),
                         0, "x", log=lambda _: None)


def test_a_stream_resumed_from_its_state_reads_on_exactly(sort_task, tokenizer, tmp_path):
    """Stopped after any step (mid-shard, mid-block, between the two rows of a split pair, past dropped rows) and
    loaded into a fresh stream: the same batches as the stream read straight on."""
    bad = {(1, 5): "{not json", (1, 6): json.dumps({"prompt": "sort: 1 2 =>", "chosen": " 1 2"})}
    train = write_shards(sort_task, tmp_path / "shards", bad=bad)
    for split in (False, True):
        straight = stream(tokenizer, train, on_bad_row="drop")
        straight.split_pairs = split
        steps = 120 if split else 60  # past the bad rows, into the second epoch
        batches = [prompts(straight.batch(step, 5)) for step in range(1, steps + 1)]
        assert straight.dropped == 2
        for stop in (7, 18, 33, 52, steps - 3):
            resumed = stream(tokenizer, train, on_bad_row="drop")
            resumed.split_pairs = split
            resumed.load_state_dict(state_after(tokenizer, train, stop, split))
            assert [prompts(resumed.batch(step, 5)) for step in range(stop + 1, steps + 1)] == batches[stop:], stop
            resumed.close()
        straight.close()


def state_after(tokenizer, train, steps, split=False, size=5):
    """The state of a fresh stream after `steps` batches of `size`, through JSON as a checkpoint keeps it."""
    source = stream(tokenizer, train, on_bad_row="drop")
    source.split_pairs = split
    for step in range(1, steps + 1):
        source.batch(step, size)
    source.close()
    return json.loads(json.dumps(source.state_dict()))


def every_row(tokenizer, paths: list[str]) -> list[tuple]:
    """The rows of these files as load_examples prepares them (not streamed), sorted."""
    from prefopt.data import load_examples

    cfg = DataConfig(train=[], max_length=48, max_prompt_length=24)
    return sorted(prompts(list(load_examples([DataSource(p) for p in paths], tokenizer, cfg, 0, "x",
                                             log=lambda _: None))))


def test_a_bad_row_stops_the_stream_naming_shard_and_line(sort_task, tokenizer, tmp_path):
    train = write_shards(sort_task, tmp_path / "shards", bad={(2, 30): "[1, 2]"})
    source = stream(tokenizer, train, shuffle_buffer=1)  # file order: shard order is (seed, epoch)'s
    with pytest.raises(StreamStop, match=r"part-2\.jsonl line 30: holds '\[1, 2\]', not a row"):
        for step in range(1, 40):
            source.batch(step, 8)
    assert source.step < 31  # raised when reached, not before
    source.close()


def test_an_unreadable_parquet_shard_is_named_or_dropped_whole(sort_task, tokenizer, tmp_path):
    import datasets

    lines = (sort_task / "train.jsonl").read_text().splitlines()
    out = tmp_path / "parquet"
    out.mkdir()
    for i in range(3):
        datasets.Dataset.from_list([json.loads(line) for line in lines[i * 80 : (i + 1) * 80]]).to_parquet(
            str(out / f"part-{i}.parquet"))
    data = (out / "part-1.parquet").read_bytes()
    (out / "part-1.parquet").write_bytes(data[: len(data) // 2])  # cut short: its footer is gone
    with pytest.raises(StreamStop, match=r"part-1\.parquet: cannot be read"):
        source = stream(tokenizer, str(out / "part-*.parquet"))
        for step in range(1, 40):
            source.batch(step, 8)
    source.close()
    source = stream(tokenizer, str(out / "part-*.parquet"), on_bad_row="drop")
    read = [row for step in range(1, 21) for row in prompts(source.batch(step, 8))]  # one epoch: 160 rows
    assert sorted(read) == every_row(tokenizer, [str(out / f"part-{i}.parquet") for i in (0, 2)])
    source.batch(21, 8)  # past the bad shard, wherever the epoch's order put it
    assert source.dropped == 1
    source.close()


def test_a_dataset_directory_streams_through_datasets(sort_task, tokenizer, tmp_path):
    """A source that is not a local .jsonl/.parquet file (a hub id; here a directory of data files, which takes
    the same path) streams through datasets' IterableDataset, and resumes by skipping the rows it read."""
    directory = tmp_path / "set"
    directory.mkdir()
    (directory / "train.jsonl").write_text((sort_task / "train.jsonl").read_text())
    source = stream(tokenizer, str(directory))
    batches = [prompts(source.batch(step, 8)) for step in range(1, 41)]  # 32 steps an epoch
    assert sorted(row for batch in batches[:32] for row in batch) == every_row(tokenizer, [str(directory)])
    resumed = stream(tokenizer, str(directory))
    resumed.load_state_dict(state_after(tokenizer, str(directory), 20, size=8))
    assert [prompts(resumed.batch(step, 8)) for step in range(21, 41)] == batches[20:]
    source.close(), resumed.close()


def test_a_malformed_shard_mid_run_keeps_what_was_trained_and_drop_resumes_past_it(sort_task, tmp_path):
    """on_bad_row: error stops at the bad line, naming it, with a checkpoint of the steps before it; the same
    command with data.on_bad_row=drop resumes from there, and its records equal a run that dropped from the
    start."""
    train = write_shards(sort_task, tmp_path / "shards", bad={(1, 40): "{\"prompt\": \"sort: 3 1 =>\", \"cho"})
    sections = {"data": {"train": train, "streaming": True, "shuffle_buffer": 1}, "train": {"max_steps": 30}}
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections)
    with pytest.raises(DataError, match=r"part-1\.jsonl line 40: not valid JSON") as stopped:
        train_recipe(path)
    assert "where the same command resumes" in str(stopped.value)
    kept = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(kept) == 1 and 0 < int(kept[0].name.split("-")[1]) < 30
    assert main(["train", str(path), "data.on_bad_row=drop"]) == 0
    dropped = {**sections, "data": {**sections["data"], "on_bad_row": "drop"}}
    train_recipe(write_recipe(tmp_path / "d.yaml", sort_task, tmp_path / "straight", **dropped))
    a, b = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "straight")
    assert [r["step"] for r in a] == [r["step"] for r in b] and a[-1]["data/dropped_rows"] == 1
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-6), x["step"]


def test_streaming_refuses_what_needs_the_whole_set(sort_task, tmp_path):
    from prefopt.errors import RecipeError

    for sections, message in (({"data": {"eval": None, "eval_fraction": 0.1}}, "data.eval_fraction"),
                              ({"reference": {"kind": "precomputed"}}, "reference.kind")):
        sections["data"] = {**sections.get("data", {}), "streaming": True}
        path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections)
        with pytest.raises(RecipeError, match=message):
            train_recipe(path)


@pytest.mark.parametrize("rollout,mini_batches", [({"filter_groups": True}, 2), ({"lag": 1}, 1)],
                         ids=["dynamic-sampling", "lag"])
def test_online_prompts_stream_and_resume_exactly(sort_task, tmp_path, rollout, mini_batches):
    """An online run streams its prompts: each sampling round (DAPO's further rounds too) the next prompts of the
    stream; stopped at step 2 and resumed, the same rollouts and losses (with a lag, the rollout drawn ahead
    comes back from the checkpoint and the stream reads on after it)."""
    from conftest import assert_resume_matches
    from test_ppo import ppo_sections

    # (mutation-checked: each fails with the position not restored)
    sections = ppo_sections(advantage="grpo", loss_aggregation="token_mean", num_mini_batches=mini_batches)
    sections["rollout"].update(rollout)
    sections["data"] = {"eval": None, "train": write_shards(sort_task, tmp_path / "shards"), "streaming": True,
                        "shuffle_buffer": 8}
    assert_resume_matches(sort_task, tmp_path, **sections)
    records = read_metrics(tmp_path / "b")
    assert records[-1]["data/epoch"] == 0.0 and "rollout/score" in records[-1]


def test_a_full_cache_disk_says_how_out(sort_task, tokenizer, tmp_path, monkeypatch):
    """Preparing a set larger than the datasets cache's disk stops with the ways out (streaming among them), not
    a bare OSError from inside datasets."""
    import errno

    import datasets

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "map", full)
    with pytest.raises(DataError, match=r"x\[0\] .*is full.*HF_DATASETS_CACHE.*data.streaming: true"):
        load_examples_in_order(tokenizer, str(sort_task / "train.jsonl"))


def test_inspect_shows_a_streams_first_rows(sort_task, tmp_path, capsys):
    train = write_shards(sort_task, tmp_path / "shards")
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", data={"train": train, "streaming": True})
    assert main(["inspect", str(path), "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "streamed from 3 shard(s); the first rows of" in out and "part-0.jsonl" in out
    assert "data.train example 1:" in out and "‖" in out


def test_kto_on_streamed_pairs_resumes_between_a_pairs_two_rows(sort_task, tmp_path):
    """KTO on pairs: each streamed pair becomes a desirable and an undesirable row; with 5 rows a step, step 1
    ends between a pair's two rows, and the run resumed there starts with the second (the same losses as
    straight through; mutation-checked)."""
    sections = {"loss": {"name": "kto", "beta": 0.1}, "train": {"batch_size": 5, "micro_batch_size": 5,
                                                                "max_steps": 3, "save_every": 1},
                "optim": {"schedule": "constant", "warmup_steps": 0, "lr": 1e-2},
                "data": {"train": write_shards(sort_task, tmp_path / "shards"), "streaming": True,
                         "shuffle_buffer": 8}}
    whole = write_recipe(tmp_path / "a.yaml", sort_task, tmp_path / "a", **sections)
    resumed = write_recipe(tmp_path / "b.yaml", sort_task, tmp_path / "b", **sections)
    train_recipe(whole)
    train_recipe(resumed, ["train.max_steps=1"])
    train_recipe(resumed)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-6)
