"""The speed switches change nothing but speed: packed and prompt-sharing layouts, the chunked LM head,
length grouping and compilation give the log-probs, gradients and losses of the plain padded path."""

import itertools

import pytest
import torch
from conftest import read_metrics, write_recipe

from prefopt import recipe as recipe_lib
from prefopt.cli import train_recipe
from prefopt.data.collate import collate_pairs, collate_rows, pack_sequences
from prefopt.errors import RecipeError
from prefopt.trainers.preference import pair_logps, unpaired_logps


def random_pairs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Pairs of very different lengths; pair 1 has a one-token completion, pair 2 a one-token prompt."""
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(3, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    pairs = [{"prompt_ids": ids(1, 20), "chosen_ids": ids(1, 30), "rejected_ids": ids(1, 30)} for _ in range(n)]
    pairs[1]["chosen_ids"] = pairs[1]["chosen_ids"][:1]
    pairs[2]["prompt_ids"] = pairs[2]["prompt_ids"][:1]
    return pairs


@pytest.fixture(scope="module")
def model(sort_task):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(sort_task / "model", dtype=torch.float32)


def test_packed_layout_by_hand():
    """Prompt [5, 6] with completions [7, 8] and [9]; prompt [4] with completion [3, 2]; shared prompts."""
    batch = pack_sequences([[5, 6], [5, 6], [4]], [[7, 8], [9], [3, 2]], pad_token_id=0, share_prompt=True)
    # segments: [5 6 | 7 8 | 9] (5 tokens) and [4 | 3 2] (3 tokens); width 5, two rows
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 2, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 0, 1]]
    scored = list(zip(batch["token_index"].tolist(), batch["token_target"].tolist(),
                      batch["token_sequence"].tolist()))
    # 6 predicts 7 and 9 (both completions start after the shared prompt), 7 predicts 8, 4 -> 3 -> 2
    assert scored == [(1, 7, 0), (2, 8, 0), (1, 9, 1), (5, 3, 2), (6, 2, 2)]
    assert batch["completion_tokens"].tolist() == [2, 1, 2]
    mask = batch["attention_mask"][0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 0],
                    [1, 1, 0, 0, 1]]  # the second completion sees the prompt and itself, not the first
    # no prompt (the first token is not scored) and an empty completion: as the padded layout counts them
    edge = pack_sequences([[], [5], [5]], [[3, 4], [], [6]], pad_token_id=0, share_prompt=True)
    assert edge["token_target"].tolist() == [4, 6] and edge["token_sequence"].tolist() == [0, 2]
    assert edge["completion_tokens"].tolist() == [1, 0, 1]
    assert collate_pairs([{"prompt_ids": [], "chosen_ids": [3, 4], "rejected_ids": [6]}],
                         0)["completion_tokens"].tolist() == [1, 0]
    plain = pack_sequences([[5, 6], [5, 6]], [[7, 8], [9]], pad_token_id=0)
    assert plain["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, 9, 0]] and "attention_mask" not in plain
    assert plain["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]


LAYOUTS = [dict(packing=p, share_prompt=s, chunk_size=c)
           for (p, s), c in itertools.product([(False, False), (True, False), (True, True)], [0, 7])]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_layout_gives_the_padded_log_probs_and_gradients(model, attn):
    model.config._attn_implementation = attn
    pairs = random_pairs(6, model.config.vocab_size)
    results = []
    for layout in LAYOUTS:
        model.zero_grad()
        batch = collate_pairs(pairs, 0, packing=layout["packing"], share_prompt=layout["share_prompt"])
        logps = pair_logps(model, batch, chunk_size=layout["chunk_size"])
        (logps.chosen.sum() - 2 * logps.rejected.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((logps, grads))
    model.config._attn_implementation = "sdpa"
    (plain, plain_grads), *others = results
    assert plain.chosen_tokens.tolist() == [len(p["chosen_ids"]) for p in pairs]
    for layout, (logps, grads) in zip(LAYOUTS[1:], others):
        assert torch.allclose(logps.chosen, plain.chosen, atol=1e-5), layout
        assert torch.allclose(logps.rejected, plain.rejected, atol=1e-5), layout
        assert torch.equal(logps.chosen_tokens, plain.chosen_tokens) and torch.equal(
            logps.rejected_tokens, plain.rejected_tokens)
        assert torch.allclose(grads, plain_grads, atol=1e-5, rtol=1e-4), layout


def test_unpaired_rows_with_kl_rows_in_every_layout(model):
    rows = [{"prompt_ids": p["prompt_ids"], "completion_ids": p["chosen_ids"], "label": i % 2 == 0}
            for i, p in enumerate(random_pairs(5, model.config.vocab_size, seed=1))]
    with torch.no_grad():
        plain = unpaired_logps(model, collate_rows(rows, 0, kl=True))
        for layout in LAYOUTS[1:]:
            batch = collate_rows(rows, 0, kl=True, packing=layout["packing"], share_prompt=layout["share_prompt"])
            out = unpaired_logps(model, batch, chunk_size=layout["chunk_size"])
            assert torch.allclose(out.logps, plain.logps, atol=1e-5) and torch.allclose(out.kl_logps, plain.kl_logps,
                                                                                        atol=1e-5), layout


def test_training_with_every_switch_on_matches_every_switch_off(sort_task, tmp_path):
    """Micro-batches of 2 from batches of 8 (so length grouping regroups them), 3 steps and an evaluation."""
    train = {"batch_size": 8, "micro_batch_size": 2, "max_steps": 3, "eval_every": 3}
    on = {**train, "packing": True, "share_prompt": True, "logps_chunk_size": 5, "group_by_length": True}
    off = {**train, "packing": False, "logps_chunk_size": 0, "group_by_length": False}
    for name, switches in (("on", on), ("off", off)):
        train_recipe(write_recipe(tmp_path / f"{name}.yaml", sort_task, tmp_path / name, train=switches))
    for split in ("train", "eval"):
        a, b = read_metrics(tmp_path / "on", split), read_metrics(tmp_path / "off", split)
        assert len(a) == len(b) == (3 if split == "train" else 2)
        assert split == "eval" or all(r["num_tokens"] > 8 * 10 for r in a)
        for ra, rb in zip(a, b):
            for key in ("loss", "rewards/margin", "logps/chosen", "logps/rejected", "grad_norm", "num_tokens"):
                if key in ra:
                    assert ra[key] == pytest.approx(rb[key], abs=1e-4), (split, ra["step"], key)
    timed = read_metrics(tmp_path / "on", timing=True)
    assert all(r["tokens_per_second"] == pytest.approx(r["num_tokens"] / r["step_seconds"]) for r in timed)


def test_compiled_decoder_layers_give_the_same_losses(sort_task, tmp_path):
    train = {"batch_size": 8, "micro_batch_size": 8, "max_steps": 2}
    for name, compile_ in (("compiled", True), ("eager", False)):
        train_recipe(write_recipe(tmp_path / f"{name}.yaml", sort_task, tmp_path / name,
                                  train={**train, "compile": compile_}))
    a, b = read_metrics(tmp_path / "compiled"), read_metrics(tmp_path / "eager")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-4)


@pytest.mark.parametrize("sections,message", [
    ({"train": {"packing": False, "share_prompt": True}}, "set train.packing: true too"),
    ({"train": {"logps_chunk_size": -1}}, r"train.logps_chunk_size: must be >= 0, got -1"),
])
def test_speed_switch_errors(sort_task, tmp_path, sections, message):
    with pytest.raises(RecipeError, match=message):
        recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))


def test_prompt_sharing_refused_for_flash_attention(sort_task, tmp_path):
    from prefopt.trainers import PreferenceTrainer

    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                        model={"attn_implementation": "flash_attention_2"}, train={"share_prompt": True})
    with pytest.raises(RecipeError, match="share_prompt needs a custom attention mask"):
        PreferenceTrainer(recipe_lib.load(path))


def test_a_model_that_mixes_packed_sequences_is_caught(sort_task, tmp_path, monkeypatch):
    """Position ids that never restart make transformers treat a packed row as one sequence: the start-up
    comparison of packed and padded log-probs stops the run with a clear error."""
    from prefopt.data import collate as collate_module
    from prefopt.trainers import PreferenceTrainer

    def no_restart(*args, **kwargs):
        batch = pack_sequences(*args, **kwargs)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        batch.pop("attention_mask", None)
        return batch

    monkeypatch.setattr(collate_module, "pack_sequences", no_restart)
    path = write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", train={"max_steps": 1})
    with pytest.raises(RecipeError, match="does not keep packed sequences apart; set train.packing: false"):
        PreferenceTrainer(recipe_lib.load(path)).fit()
