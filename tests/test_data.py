"""Row formats, the exact prompt/completion boundary, truncation, and unusable rows."""

import json
import re

import pytest

from prefopt.data import load_examples
from prefopt.data.collate import collate_pairs
from prefopt.data.formats import BadRow, canonical_pair
from prefopt.data.tokenize import tokenize_examples
from prefopt.errors import DataError
from prefopt.recipe import DataConfig, DataSource


def cfg(**kw):
    return DataConfig(train=[], **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_standard_rows_split_the_joint_tokenization_and_get_eos(tokenizer):
    """The prompt's own ids, then the joint ids after them; "Hello wor" + "ld" merges across the boundary, so
    the prompt keeps its ids up to where they diverge (the boundary rule of prefopt.data.tokenize)."""
    row = {"prompt": "Hello wor", "chosen": "ld, the sky", "rejected": "ld is green."}
    (pair,), report = tokenize_examples([canonical_pair(row, tokenizer)], tokenizer, 64, 32)
    eos = tokenizer.eos_token_id
    own = tokenizer("Hello wor")["input_ids"]
    assert pair["prompt_ids"] == own[: len(pair["prompt_ids"])] and report.boundary_merged == 1
    assert pair["prompt_ids"] + pair["chosen_ids"] == tokenizer("Hello world, the sky")["input_ids"] + [eos]
    assert pair["prompt_ids"] + pair["rejected_ids"] == tokenizer("Hello world is green.")["input_ids"] + [eos]


def test_eos_is_not_doubled(tokenizer):
    row = {"prompt": "sort: 2 1 =>", "chosen": " 1 2<|endoftext|>", "rejected": " 2 1"}
    (pair,), _ = tokenize_examples([canonical_pair(row, tokenizer)], tokenizer, 64, 32)
    assert pair["chosen_ids"].count(tokenizer.eos_token_id) == 1
    assert pair["rejected_ids"][-1] == tokenizer.eos_token_id


def test_conversational_rows_render_the_chat_template(tokenizer):
    row = {"prompt": [{"role": "user", "content": "What color is the sky?"}],
           "chosen": [{"role": "assistant", "content": "It is blue."}],
           "rejected": [{"role": "assistant", "content": "It is green."}]}
    ex = canonical_pair(row, tokenizer)
    prompt = "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n"
    assert ex == {"prompt": prompt, "chosen": "It is blue.<|im_end|>\n", "rejected": "It is green.<|im_end|>\n",
                  "full_chosen": prompt + "It is blue.<|im_end|>\n", "full_rejected": prompt + "It is green.<|im_end|>\n",
                  "chat": True}
    (pair,), _ = tokenize_examples([ex], tokenizer, 64, 32)
    assert tokenizer.decode(pair["prompt_ids"] + pair["chosen_ids"]) == ex["prompt"] + ex["chosen"]
    assert tokenizer.eos_token_id not in pair["chosen_ids"]  # the template's end of turn ends a chat reply


def test_implicit_prompt_messages_and_text(tokenizer):
    user = {"role": "user", "content": "What color is the sky?"}
    row = {"chosen": [user, {"role": "assistant", "content": "Blue."}],
           "rejected": [user, {"role": "assistant", "content": "Green."}]}
    ex = canonical_pair(row, tokenizer)
    assert ex["prompt"].endswith("<|im_start|>assistant\n") and ex["chosen"] == "Blue.<|im_end|>\n"
    text = canonical_pair({"chosen": "The sky is blue.", "rejected": "The sky is green."}, tokenizer)
    assert text == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "chat": False}


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "'chosen' is an empty string"),
    ({"prompt": "p", "chosen": 5, "rejected": "r"}, "'chosen' is int 5"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, "'rejected' is missing"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}, "'chosen'[0] is not a {role: str"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant",
      "content": "r"}]}, "mixes plain strings and message lists"),
    ({"chosen": "abc", "rejected": "xyz"}, "share no prefix"),
])
def test_bad_rows_say_why(tokenizer, row, reason):
    with pytest.raises(BadRow, match=re.escape(reason)):
        canonical_pair(row, tokenizer)


def test_truncation_keeps_prompt_end_and_fits_max_length(tokenizer):
    row = {"prompt": "sort: " + " ".join("9876543210" * 3) + " =>", "chosen": " 1 2 3 4 5 6 7 8 9" * 3,
           "rejected": " 1"}
    (pair,), report = tokenize_examples([canonical_pair(row, tokenizer)], tokenizer, max_length=30,
                                        max_prompt_length=12)
    full_prompt = tokenizer(row["prompt"])["input_ids"]
    assert pair["prompt_ids"] == full_prompt[-12:]  # no special tokens at its head to keep
    assert len(pair["prompt_ids"]) + len(pair["chosen_ids"]) == 30
    assert (report.prompts_cut, report.completions_cut) == (1, 1)


def test_collate_puts_chosen_then_rejected_with_masks(tokenizer):
    pairs = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]},
             {"prompt_ids": [11], "chosen_ids": [12], "rejected_ids": [13, 14]}]
    batch = collate_pairs(pairs, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 12, 0, 0, 0], [5, 6, 10, 0, 0],
                                           [11, 13, 14, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                                 [0, 1, 1, 0, 0]]


def test_bad_dataset_stops_with_row_and_file(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "a", "chosen": "", "rejected": "c"},
        {"prompt": "a", "chosen": "b", "rejected": 7},
    ])
    with pytest.raises(DataError) as err:
        load_examples([DataSource(str(path))], tokenizer, cfg(), 0, "data.train", log=lambda s: None)
    message = str(err.value)
    assert "2 of 3 rows" in message and "pairs.jsonl" in message
    assert "row 1: 'chosen' is an empty string" in message and "row 2: 'rejected' is int 7" in message
    assert "data.on_bad_row=drop" in message
    logged = []
    pairs = load_examples([DataSource(str(path))], tokenizer, cfg(on_bad_row="drop"), 0, "data.train",
                       log=logged.append)
    assert len(pairs) == 1 and "dropped 2 of 3 rows" in logged[0]


def test_missing_column_and_missing_file(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "no_rejected.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"data.train\[0\] \(.*no_rejected.jsonl\): missing column 'rejected'"):
        load_examples([DataSource(str(path))], tokenizer, cfg(), 0, "data.train", log=lambda s: None)
    with pytest.raises(DataError, match="file not found: .*nope.jsonl"):
        load_examples([DataSource(str(tmp_path / "nope.jsonl"))], tokenizer, cfg(), 0, "data.train")


def test_mixture_weights_scale_rows(tokenizer, tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": " a", "rejected": " b"} for i in range(10)]
    first = write_jsonl(tmp_path / "first.jsonl", rows)
    second = write_jsonl(tmp_path / "second.csv.jsonl", rows[:4])
    pairs = load_examples([DataSource(str(first), weight=0.5), DataSource(str(second), weight=2.0)], tokenizer,
                       cfg(), 0, "data.train", log=lambda s: None)
    assert len(pairs) == 5 + 8


def test_tokenized_rows_stay_in_arrow_and_read_as_lists_of_dicts(tokenizer, tmp_path):
    """load_examples gives Rows over the datasets cache's Arrow table: sources with other columns joined (a margin
    in one), weights repeating rows, a bad row dropped; each way of reading (an index, a negative one, a slice,
    take, iteration, select) gives the same dicts, None values left out."""
    from prefopt.data import Rows, rows_at

    plain = [{"prompt": f"p{i}", "chosen": " a", "rejected": " b"} for i in range(6)]
    margins = [{"prompt": f"q{i}", "chosen": " c", "rejected": " d", "margin": float(i)} for i in range(3)]
    first = write_jsonl(tmp_path / "plain.jsonl", plain + [{"prompt": "x", "chosen": "", "rejected": " b"}])
    second = write_jsonl(tmp_path / "margins.jsonl", margins)
    rows = load_examples([DataSource(str(first), weight=1.5), DataSource(str(second))], tokenizer,
                         cfg(on_bad_row="drop"), 0, "data.train", log=lambda s: None)
    assert isinstance(rows, Rows) and len(rows) == 6 + 3 + 3  # 1.5 x 7 rows less the bad one (twice at most)
    listed = list(rows)
    assert [r for r in listed if "margin" in r] == listed[-3:] and listed[-1]["margin"] == 2.0
    assert all(set(r) == {"prompt_ids", "chosen_ids", "rejected_ids"} for r in listed[:-3])
    assert rows[-1] == listed[-1] and rows[3] == listed[3] and list(rows[2:5]) == listed[2:5]
    assert rows_at(rows, [4, 0, 4]) == [listed[4], listed[0], listed[4]] == list(rows.select([4, 0, 4]))
    with pytest.raises(IndexError):
        rows[len(rows)]


def test_reading_a_row_reads_only_the_record_batch_that_holds_it(tmp_path):
    """Rows over a memory-mapped table of many record batches (as the datasets cache is): a row, or rows from a
    few batches, map only their batches' pages, not the table (Table.take would concatenate every chunk first),
    and come back in the order asked."""
    import numpy as np
    import pyarrow as pa

    from prefopt.data import Rows

    ids = pa.list_(pa.int64())
    path = tmp_path / "table.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, pa.schema([("prompt_ids", ids)])) as writer:
        for k in range(400):  # 400 batches of 100 rows of 400 ids: 128 MB
            values = np.repeat(np.arange(k * 100, (k + 1) * 100), 400)
            writer.write_batch(pa.record_batch([pa.ListArray.from_arrays(np.arange(0, 40001, 400, dtype=np.int32),
                                                                         values)], names=["prompt_ids"]))

    def mapped_mib() -> float:  # this file's pages mapped into the process
        total = 0
        for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read()):
            if block.split("\n")[0].endswith(str(path)):
                total += int(re.search(r"^Rss:\s+(\d+)", block, re.M).group(1))
        return total / 1024

    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    rows = Rows(table, np.arange(table.num_rows)[::-1])
    before = mapped_mib()
    got = rows.take([0, 39999, 5, 20050, 1])
    assert [(r["prompt_ids"][0], len(r["prompt_ids"])) for r in got] == [(39999, 400), (0, 400), (39994, 400),
                                                                         (19949, 400), (39998, 400)]
    assert mapped_mib() - before < 32, "reading 5 rows mapped most of the 128 MB table"  # huge pages: 2 MB a row


def test_a_checked_file_is_not_read_again_until_it_changes(tokenizer, tmp_path, monkeypatch):
    """The line-by-line check of a JSON Lines file runs once per (path, size, modification time): a second load
    skips it; a line appended (a malformed one) makes it run again and name the line."""
    from prefopt.data import sources

    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"p{i}", "chosen": " a", "rejected": " b"} for i in range(4)])
    load_examples([DataSource(str(path))], tokenizer, cfg(), 0, "data.train", log=lambda s: None)
    calls = []
    monkeypatch.setattr(sources, "_check_text", lambda *args: calls.append(args))
    load_examples([DataSource(str(path))], tokenizer, cfg(), 0, "data.train", log=lambda s: None)
    assert calls == []
    monkeypatch.undo()
    with open(path, "a") as f:
        f.write('{"prompt": "p", "chosen": oops}\n')
    with pytest.raises(DataError, match="line 5 is not valid JSON"):
        load_examples([DataSource(str(path))], tokenizer, cfg(), 0, "data.train", log=lambda s: None)


def test_a_glob_reads_shards_in_name_order_and_names_a_malformed_shards_line(tokenizer, tmp_path):
    for k in range(3):
        write_jsonl(tmp_path / f"part-{k}.jsonl", [{"prompt": f"p{k}-{i}", "chosen": " a", "rejected": " b"}
                                                   for i in range(5)])
    rows = load_examples([DataSource(str(tmp_path / "part-*.jsonl"))], tokenizer, cfg(), 0, "data.train",
                         log=lambda s: None)
    assert len(rows) == 15 and tokenizer.decode(rows[5]["prompt_ids"]).startswith("p1-0")
    with open(tmp_path / "part-1.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=r"part-1.jsonl line 6 is not valid JSON"):
        load_examples([DataSource(str(tmp_path / "part-*.jsonl"))], tokenizer, cfg(), 0, "data.train")
    with pytest.raises(DataError, match="no file matches"):
        load_examples([DataSource(str(tmp_path / "none-*.jsonl"))], tokenizer, cfg(), 0, "data.train")


def test_rows_count_missing_values_by_arrow_as_rows_show_them(tokenizer, tmp_path):
    """Rows.lacking(column) (what a reward function's required column is checked with, no row read) equals the
    rows whose dict lacks the key: None values, and sources without the column."""
    from prefopt.data import load_prompts

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"sort: {i} 1 =>", **({"answer": str(i)} if i % 3 else {})}) + "\n"
                         for i in range(10)))
    b.write_text("".join(json.dumps({"prompt": f"sort: 2 {i} =>"}) + "\n" for i in range(4)))
    rows = load_prompts([DataSource(str(a)), DataSource(str(b), weight=2.0)], tokenizer, DataConfig(train=[]), 0,
                        "x", log=lambda _: None)
    for column in ("answer", "prompt", "absent"):
        assert rows.lacking(column) == sum(column not in row for row in rows), column
    assert rows.lacking("answer") == 4 + 8


def test_pairs_split_in_place_read_as_the_rows_of_as_rows(tokenizer, tmp_path):
    """KTO/BCO on pairs: the Arrow rows split each pair when read (no list of all rows), into the rows as_rows
    makes of the same examples, in a mixture of pairs and unpaired rows, selected and taken in any order."""
    import numpy as np

    from prefopt.data import as_rows

    pairs, unpaired = tmp_path / "p.jsonl", tmp_path / "u.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"sort: {i} 1 =>", "chosen": " 1 2", "rejected": f" {i}",
                                         "margin": i}) + "\n" for i in range(5)))
    unpaired.write_text("".join(json.dumps({"prompt": f"sort: 2 {i} =>", "completion": " 2", "label": i % 2 == 0})
                                + "\n" for i in range(3)))
    rows = load_examples([DataSource(str(pairs), weight=1.5), DataSource(str(unpaired))], tokenizer,
                         DataConfig(train=[]), 0, "x", takes="unpaired", log=lambda _: None)
    split, expected = as_rows(rows), as_rows(list(rows))
    assert len(split) == len(expected) == 2 * 7 + 3 and list(split) == expected  # 5 pairs, 2 repeated; 3 rows
    order = np.random.default_rng(0).permutation(len(split))
    assert split.take(order) == [expected[i] for i in order]
    assert list(split.select(order[:7])) == [expected[i] for i in order[:7]]
