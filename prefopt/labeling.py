"""Pair labelling: prompts with several completions -> chosen/rejected pairs by a scorer (best vs worst of n),
the first step of iterative / online DPO."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prefopt.errors import PrefoptError
from prefopt.recipe_online import RewardTerm
from prefopt.rewards import RewardTerms
from prefopt.scoring import RewardScorer


def best_vs_worst(prompts: list, completions: list[list[str]], scorer) -> tuple[list[dict], int, list[dict]]:
    """For each prompt, the best- and worst-scored completion as a pair; prompts whose scores all tie are
    skipped (there is no preference to learn), and counted. Also every prompt's completions with their scores."""
    flat_prompts = [p for p, cs in zip(prompts, completions) for _ in cs]
    scores = scorer(flat_prompts, [c for cs in completions for c in cs]).tolist()
    pairs, ties, start, scored = [], 0, 0, []
    for prompt, candidates in zip(prompts, completions):
        mine = scores[start : start + len(candidates)]
        start += len(candidates)
        scored.append({"prompt": prompt, "completions": candidates, "scores": mine})
        best, worst = max(range(len(mine)), key=mine.__getitem__), min(range(len(mine)), key=mine.__getitem__)
        if mine[best] == mine[worst]:
            ties += 1
            continue
        pairs.append({"prompt": prompt, "chosen": candidates[best], "rejected": candidates[worst],
                      "chosen_score": mine[best], "rejected_score": mine[worst]})
    return pairs, ties, scored


@torch.no_grad()
def sample(model_path: str, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
           engine: str = "hf", seed: int = 0) -> list[list[str]]:
    """n sampled completions per prompt from a causal LM, stopped at EOS, through the online engines (HF generate
    or vLLM): each completion a seeded draw from (seed, row), so a second call gives the same."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.generation import Draw
    from prefopt.online.engines import HFEngine, VLLMEngine

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = [tokenizer(p)["input_ids"] for p in prompts for _ in range(n)]
    draw = Draw(seed, torch.arange(len(ids)), len(ids))
    if engine == "vllm":
        llm = VLLMEngine(model_path, seed=seed, max_model_len=max(map(len, ids)) + max_new_tokens,
                         gpu_memory_utilization=0.5, tensor_parallel_size=1, dtype="auto", temperature=temperature,
                         eos_token_id=tokenizer.eos_token_id)
    else:
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        llm = HFEngine(tokenizer, temperature=temperature, top_p=1.0)
        llm.sync(AutoModelForCausalLM.from_pretrained(model_path).to(accelerator.device).eval(), accelerator)
    try:
        tokens, _ = llm.generate(ids, draw, max_new_tokens)
    finally:
        llm.close()
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def label_file(args) -> str:
    rows = [json.loads(line) for line in Path(args.input).read_text().splitlines() if line.strip()]
    prompts = [row["prompt"] for row in rows]
    if args.policy:
        completions = sample(args.policy, prompts, args.n, args.max_new_tokens, args.temperature, args.engine,
                             args.seed)
    elif all(isinstance(row.get("completions"), list) and len(row["completions"]) >= 2 for row in rows):
        completions = [row["completions"] for row in rows]
    else:
        raise PrefoptError(f"{args.input}: each row needs 'completions' (a list of at least 2), or pass --policy")
    if bool(args.reward) == bool(args.verifier):
        raise PrefoptError("give --reward (one or more reward models) or --verifier module:function, not both")
    if args.verifier:  # called as TRL calls a reward function, with each row's other columns
        terms = RewardTerms([RewardTerm(name="verifier", function=args.verifier)], "--verifier")
        columns = [{k: v for k, v in row.items() if k != "completions"} for row, cs in zip(rows, completions)
                   for _ in cs]

        def scorer(prompts, completions):
            return terms(prompts, completions, columns).total
    else:
        scorer = RewardScorer(args.reward, aggregate=args.aggregate, std_coef=args.std_coef)
    pairs, ties, scored = best_vs_worst(prompts, completions, scorer)
    out = Path(args.out)
    samples = out.with_name(out.stem + ".samples.jsonl")  # what was scored, to look at
    samples.write_text("".join(json.dumps(row) + "\n" for row in scored))
    if not pairs:
        raise PrefoptError(f"0 pairs from {len(prompts)} prompts: every prompt's completions scored the same (the "
                           f"scored completions are in {samples}). Sample more or more varied completions (--n, "
                           "--temperature) or check the scorer; nothing was written to " + str(out))
    out.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return (f"wrote {len(pairs)} pairs from {len(prompts)} prompts to {out} ({ties} prompts skipped: every "
            f"completion scored the same; the scored completions are in {samples})")
