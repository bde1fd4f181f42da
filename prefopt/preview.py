"""`prefopt inspect RECIPE`: rows as the model will see them, before anything trains.

Each token is shown as the tokenizer names it (special tokens, SentencePiece's "▁" and byte fallback
visible), tokens apart by "|", the prompt/completion boundary by " ‖ ". This is where a wrong chat template,
a missing BOS or a bad boundary shows.
"""

from __future__ import annotations

from pathlib import Path

BOUNDARY = " ‖ "


def inspect_recipe(path: str | Path, overrides: list[str] = (), rows: int = 3) -> str:
    from prefopt import recipe as recipe_lib
    from prefopt.data import load_examples, load_prompts
    from prefopt.methods import METHODS
    from prefopt.models import load_tokenizer

    recipe = recipe_lib.load(path, overrides)
    tokenizer = load_tokenizer(recipe.model, recipe.data.chat_template_kwargs)
    data, lines = recipe.data, []
    out = [f"recipe {path}: tokenizer {type(tokenizer).__name__} of {recipe.model.name_or_path} (BOS "
           f"{tokenizer.bos_token!r}, EOS {tokenizer.eos_token!r}); data.max_length {data.max_length}, "
           f"data.max_prompt_length {data.max_prompt_length}, data.truncation {data.truncation}"]
    for split, sources in (("train", data.train), ("eval", data.eval or [])):
        if not sources:
            continue
        prompts = METHODS[recipe.method].prompts_only
        if data.streaming and split == "train":  # the first rows of the first shard, nothing prepared ahead
            from prefopt.data.stream import Stream

            stream = Stream(sources, tokenizer, data, recipe.seed, "data.train", "prompts" if prompts else "any",
                            log=lines.append)
            examples = stream.sample
            lines.append(f"[prefopt] data.train: streamed from {len(stream.shards)} shard(s); the first rows of "
                         f"{stream.shards[0].name}:")
        elif prompts:
            examples = load_prompts(sources, tokenizer, data, recipe.seed, f"data.{split}", log=lines.append)
        else:
            examples = load_examples(sources, tokenizer, data, recipe.seed, f"data.{split}", takes="any",
                                     log=lines.append)
        out += ["", *lines]
        lines.clear()
        for i, example in enumerate(examples[:rows]):
            out.append(f"\ndata.{split} example {i}:")
            out += show_example(tokenizer, example)
    return "\n".join(out)


def show_example(tokenizer, example: dict) -> list[str]:
    """One tokenized example: prompt ‖ completion per completion key, with token counts."""
    prompt = "|".join(tokenizer.convert_ids_to_tokens(example["prompt_ids"]))
    keys = [key[: -len("_ids")] for key in example if key.endswith("_ids") and key != "prompt_ids"]
    lines = [f"  prompt ({len(example['prompt_ids'])} tokens)" + (f", label {example['label']}" if "label" in example
                                                                   else "")]
    if not keys:
        return lines + [f"    {prompt}"]
    for key in keys:
        ids = example[f"{key}_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        mask = example.get(f"{key}_mask") or [1] * len(ids)  # SFT's assistant turns: untrained ones in ⟦ ⟧
        shown = "|".join(token if trains else f"⟦{token}⟧" for token, trains in zip(tokens, mask))
        trained = f", {sum(mask)} trained, ⟦untrained⟧" if 0 in mask else ""
        lines.append(f"  {key} ({len(ids)} tokens{trained}): {prompt}{BOUNDARY}{shown}")
    return lines
