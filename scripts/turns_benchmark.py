"""What many turns cost: the same number of sampled tokens in one turn, and over N turns through prefopt's agent loop
(prefopt.online.agent: each turn re-reads the prompt and the trajectory so far, a tool runs, its reply is inserted as
tokens), with the HF engine on the calculator task's tiny model.

    python scripts/turns_benchmark.py [--turns 4] [--tokens 128] [--rows 16] [--repeats 3]

Each turn samples tokens/turns tokens (EOS suppressed so every run samples exactly as many) and, but the last, calls
the calculator tool. Prints the median seconds of each and their ratio (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


class ExactEngine:
    """Greedy HF generation of exactly max_new_tokens tokens (EOS suppressed), on a tiny model."""

    samples_from_trainer = True

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.turn_tokens = None  # a turn's length, under the budget the agent gives

    def generate(self, prompts, draw, max_new_tokens):
        from prefopt.generation import pad_prompts

        max_new_tokens = min(max_new_tokens, self.turn_tokens or max_new_tokens)
        ids, mask = pad_prompts(prompts, self.tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return out[:, ids.shape[1]:].tolist(), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128, help="sampled tokens per trajectory")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.data.synthetic import write_calculator_task
    from prefopt.online import agent as agent_module
    from prefopt.recipe_online import RolloutConfig

    work = Path(tempfile.mkdtemp(prefix="prefopt-turns-"))
    write_calculator_task(work, n_train=200, n_eval=10)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model").eval()
    engine = ExactEngine(model, tokenizer)
    rows = [{"prompt": [{"role": "user", "content": f"add {100 + i} + {200 + i}"}]} for i in range(args.rows)]
    per_turn = args.tokens // args.turns
    agent = agent_module.Agent(RolloutConfig(tools=["prefopt.data.synthetic:calculator"], max_turns=args.turns,
                                             tool_timeout=5), tokenizer)
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "100 + 200"}}}]}
    agent_module.parse_reply = lambda tokenizer, ids, *rest: call  # every turn calls the tool (max_turns ends it)
    engine.turn_tokens = 1
    prompts = [agent.run(engine, [row], None, 1)[0].prompt_ids[0] for row in rows]

    def one_turn() -> int:
        engine.turn_tokens = None
        return sum(map(len, engine.generate(prompts, None, args.tokens)[0]))

    def many_turns() -> int:
        engine.turn_tokens = per_turn
        out, _ = agent.run(engine, rows, None, 10**6)
        return sum(sum(mask) for mask in out.tool_mask)

    results = {}
    for name, fn in (("one turn", one_turn), (f"{args.turns} turns", many_turns)):
        fn()  # warm-up
        times, sampled = [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            sampled = fn()
            times.append(time.perf_counter() - start)
        results[name] = statistics.median(times)
        print(f"{name:>10}: {results[name]:.3f} s for {sampled} sampled tokens ({args.rows} rows)")
    agent.close()
    ratio = results[f"{args.turns} turns"] / results["one turn"]
    print(f"{args.turns} turns / one turn: {ratio:.2f}x (torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
