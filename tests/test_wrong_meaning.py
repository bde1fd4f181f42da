"""Inputs that used to train wrongly or crash without a word: each is refused with the place named."""

import json

import pytest
from conftest import write_recipe

from prefopt import recipe as recipe_lib
from prefopt.cli import train_recipe
from prefopt.errors import DataError, RecipeError


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\ntrain:\n  max_steps: 3\n  max_steps: 5\n")
    with pytest.raises(RecipeError, match=r"'max_steps' is written twice in one section, on line 4 and line 5"):
        recipe_lib.load(path)
    path.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\ntrain: {max_steps: 3}\ntrain: {eval_every: 1}\n")
    with pytest.raises(RecipeError, match=r"'train' is written twice.*line 3 and line 4"):
        recipe_lib.load(path)


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=[1", "the value is not plain YAML"),
    ("train.max_steps=!!python/object/apply:os.system ['true']", "the value is not plain YAML"),
    ("seed=-1", r"seed: must be in \[0, 2\^32\), got -1"),
    (f"seed={2**40}", r"seed: must be in \[0, 2\^32\)"),
    ("output_dir=", "output_dir: is empty"),
])
def test_bad_overrides_are_named(sort_task, tmp_path, override, message):
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run")
    with pytest.raises(RecipeError, match=message):
        recipe_lib.load(path, [override])


def test_an_output_dir_holding_other_files_is_refused_and_nothing_is_moved(sort_task, tmp_path, monkeypatch):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "recipe.yaml").write_text("mine")
    (mine / "notes.txt").write_text("mine")
    monkeypatch.chdir(mine)
    for output_dir, message in ((".", "is the current directory"), (str(mine), "is the current directory")):
        path = write_recipe(tmp_path / "r.yaml", sort_task, output_dir)
        with pytest.raises(RecipeError, match=message):
            train_recipe(path, restart=True)
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "project")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=r"holds files that are not a prefopt run's \(notes.txt\)"):
        train_recipe(path, restart=True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "recipe.yaml"]
    assert (mine / "recipe.yaml").read_text() == "mine"


def rows_file(tmp_path, lines: list[str], name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


PAIR = json.dumps({"prompt": "sort: 2 1 =>", "chosen": " 1 2", "rejected": " 2 1"})


@pytest.mark.parametrize("lines, message", [
    ([PAIR, "null", PAIR], r"line 2 holds 'null', not a row"),
    ([PAIR, '{"prompt": "a", "chosen": ', PAIR], "line 2 is not valid JSON"),
    ([PAIR, json.dumps({"prompt": [{"role": "user", "content": "sort: 2 1 =>"}], "chosen": [{"role": "assistant",
      "content": " 1 2"}], "rejected": [{"role": "assistant", "content": " 2 1"}]})],
     r"column 'prompt' holds text on line 1 and a list \(messages\) on line 2"),
])
def test_jsonl_rows_are_checked_before_arrow_reads_them(sort_task, tmp_path, lines, message):
    data = rows_file(tmp_path, lines)
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", data={"train": str(data), "eval": None})
    with pytest.raises(DataError, match=message):
        train_recipe(path)
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_csv_with_a_repeated_header_column_is_refused(sort_task, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("prompt,chosen,rejected,chosen\nsort: 2 1 =>, 1 2, 2 1, 2 1\n")
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", data={"train": str(data), "eval": None})
    with pytest.raises(DataError, match=r"column\(s\) 'chosen' more than once in its header"):
        train_recipe(path)
