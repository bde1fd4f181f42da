"""Small verifiable tasks, and the tiny model and tokenizer that learn them on a CPU.

`write_sort_task(out_dir)` writes everything the quickstart recipe needs:

    out_dir/model/        a tiny Llama-shaped causal LM and its byte-level BPE
                          tokenizer (with a ChatML chat template), saved with
                          save_pretrained and so loaded like any hub model
    out_dir/train.jsonl   preference pairs: prompt "sort: 7 2 9 =>",
    out_dir/eval.jsonl    chosen " 2 7 9" (sorted), rejected a wrong order
    out_dir/sft.jsonl     the training prompts with their sorted answer as `completion` (SFT rows)

`write_arithmetic_task(out_dir)` writes a verifiable task for online methods, the same way:

    out_dir/train.jsonl   prompts "add: 3 + 4 =" with the ground truth in an `answer` column ("7"),
    out_dir/eval.jsonl    which a reward function reads (arithmetic_correct, number_format)
    out_dir/sft.jsonl     the prompts with " 7" as `completion` (a starting policy by SFT)

`write_chain_task(out_dir)` writes multi-step addition with the work shown ("add: 3 + 4 + 5 =" -> " 7 12"),
its outcome read from the last number (chain_correct): a task whose intermediate steps decide the answer.

`write_calculator_task(out_dir)` writes a tool task (multi-turn rollouts, rollout.tools):

    out_dir/model/        the tiny model, its tokenizer ending turns with <|im_end|> and a compact
                          tool-calling chat template (CALCULATOR_TEMPLATE)
    out_dir/train.jsonl   prompts "add 347 + 589" (messages) with `answer` "936", which the tiny
    out_dir/eval.jsonl    model cannot compute alone but can with `calculator(expression)`
    out_dir/sft.jsonl     tool-using transcripts (`messages`, `tools`): the call, the reply, the answer

`write_selfcheck_task(out_dir)`: two-turn self-correction with an environment (SelfCheck: submit, "check your
answer", submit again; the reward is the second answer's correctness), in the same layout.

The model starts from random weights: the task checks that the trainer learns,
not what a pretrained model already knows.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A little English beside the task text, so that tests can use ordinary sentences.
ENGLISH = [
    "The sky is blue and the grass is green.",
    "What color is the sky? It is blue. It is green.",
    "Hello world, this is a tiny tokenizer for tests.",
    "Answer the question briefly and politely.",
]


def sort_pair(rng: random.Random, min_len: int = 3, max_len: int = 6, max_value: int = 9) -> dict[str, str]:
    while True:
        values = [rng.randint(0, max_value) for _ in range(rng.randint(min_len, max_len))]
        if len(set(values)) > 1:
            break
    target = sorted(values)
    wrong = values[:]
    while wrong == target:
        rng.shuffle(wrong)
    return {
        "prompt": "sort: " + " ".join(map(str, values)) + " =>",
        "chosen": " " + " ".join(map(str, target)),
        "rejected": " " + " ".join(map(str, wrong)),
    }


def sort_score(prompt: str, completion: str) -> float:
    """Verifier: 1.0 if the completion is the prompt's numbers in ascending order."""
    numbers = prompt.removeprefix("sort:").removesuffix("=>").split()
    return float(completion.split() == sorted(numbers, key=int))


def content(value) -> str:
    """The text of a prompt or completion: a string as it is, a message list's last message's content (TRL passes
    conversational completions as [{"role": "assistant", "content": ...}])."""
    return value[-1]["content"] if isinstance(value, list) else value


def sort_scores(prompts: list, completions: list, **kwargs) -> list[float]:
    """sort_score over a batch: the verifier as a reward function (TRL's form; prefopt label --verifier, PPO)."""
    return [sort_score(content(p), content(c)) for p, c in zip(prompts, completions)]


def arithmetic_row(rng: random.Random, max_value: int = 20) -> dict[str, str]:
    a, b = rng.randint(0, max_value), rng.randint(0, max_value)
    return {"prompt": f"add: {a} + {b} =", "answer": str(a + b)}


def arithmetic_correct(completions: list, answer: list, **kwargs) -> list[float]:
    """Correctness: 1.0 where the completion's first number equals the row's `answer` column, compared as numbers
    (an answer column of integers or of strings, "7" or 7, both work)."""
    numbers = [re.findall(r"-?\d+", content(c)) for c in completions]
    return [float(bool(found) and int(found[0]) == int(str(truth).strip())) for found, truth in zip(numbers, answer)]


def sum_correct(prompts: list, completions: list, **kwargs) -> list[float]:
    """arithmetic_correct read from the prompt itself ("add: 3 + 4 =" sums to 7): 1.0 where the completion's first
    number is the sum. Needs no `answer` column (offline evaluations' eval.rewards see the prompt alone)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        total = sum(int(n) for n in re.findall(r"-?\d+", content(prompt).partition(":")[2]))
        found = re.findall(r"-?\d+", content(completion))
        out.append(float(bool(found) and int(found[0]) == total))
    return out


def chain_row(rng: random.Random, max_value: int = 9) -> dict[str, str]:
    """Multi-step addition with its work shown: "add: 3 + 4 + 5 =" -> " 7 12" (each running sum), answer "12"."""
    values = [rng.randint(0, max_value) for _ in range(rng.randint(3, 4))]
    sums = [sum(values[: i + 1]) for i in range(1, len(values))]
    return {"prompt": "add: " + " + ".join(map(str, values)) + " =", "answer": str(sums[-1]),
            "work": " " + " ".join(map(str, sums))}


def chain_correct(completions: list, answer: list, **kwargs) -> list[float]:
    """The outcome: 1.0 where the completion's last number is the row's `answer` (the work before it is not read)."""
    numbers = [re.findall(r"-?\d+", content(c)) for c in completions]
    return [float(bool(found) and int(found[-1]) == int(str(truth).strip())) for found, truth in zip(numbers, answer)]


def number_format(completions: list, **kwargs) -> list[float]:
    """Format: 1.0 where the completion is one number and nothing else."""
    return [float(re.fullmatch(r"\s*-?\d+\s*", content(c)) is not None) for c in completions]


# a compact tool-calling template (the tools by name, calls as <tool_call>{json}</tool_call>): short sequences for
# a tiny model; the same shapes as Qwen2.5's
CALCULATOR_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools:{% for tool in tools %} {{ (tool.function or tool).name }}{% endfor %}"
    "<|im_end|>\n{% endif %}{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.content %}{{ message.content }}{% endif %}{% for call in message.tool_calls or [] %}"
    "<tool_call>{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of integers with + - and *.

    Args:
        expression: The expression, for example "347 + 589".
    """
    if not re.fullmatch(r"[\d\s+*-]+", expression):
        raise ValueError(f"not an expression of integers with + - *: {expression!r}")
    return str(eval(expression, {"__builtins__": {}}))  # digits and + - * only, checked above


def calculator_row(rng: random.Random, digits: int = 3) -> dict:
    a, b = rng.randint(10 ** (digits - 1), 10**digits - 1), rng.randint(10 ** (digits - 1), 10**digits - 1)
    return {"prompt": [{"role": "user", "content": f"add {a} + {b}"}], "answer": str(a + b)}


def calculator_transcript(row: dict) -> dict:
    """An SFT row: the prompt, the call, the tool's reply and the answer, with the tool's schema."""
    from transformers.utils import get_json_schema

    expression = row["prompt"][0]["content"].removeprefix("add ")
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
    return {"messages": row["prompt"] + [{"role": "assistant", "content": "", "tool_calls": [call]},
                                         {"role": "tool", "name": "calculator", "content": calculator(expression)},
                                         {"role": "assistant", "content": row["answer"]}],
            "tools": json.dumps([get_json_schema(calculator)])}


def answer_correct(completions: list, answer: list, **kwargs) -> list[float]:
    """Correctness of a (multi-turn) completion: its last message is the row's `answer`, as a number."""
    return [float(content(c).strip() == str(truth).strip()) for c, truth in zip(completions, answer)]


def write_calculator_task(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                          hidden_size: int = 128, num_layers: int = 4) -> Path:
    """Write model/, train.jsonl, eval.jsonl and sft.jsonl for the calculator tool task under out_dir (a model
    large enough to copy numbers: 64 wide and 2 deep stays near 0 held-out accuracy after 600 SFT steps)."""
    rng = random.Random(seed)
    splits = {"train": [calculator_row(rng) for _ in range(n_train)],
              "eval": [calculator_row(rng) for _ in range(n_eval)]}
    splits["sft"] = [calculator_transcript(row) for row in splits["train"]]
    return _write_tool_task(out_dir, splits, [calculator], hidden_size, num_layers, seed)


class SelfCheck:
    """A two-turn self-correction environment (Kumar et al. 2024, "Training Language Models to Self-Correct via
    Reinforcement Learning"), in TRL's form: the model answers with submit(answer); the first submission is
    answered "Check your answer and submit it again.", the second ends the episode. get_reward: the second
    submission's correctness (first_submission_correct reports the first's)."""

    def reset(self, **row):
        self.answer, self.submissions = str(row["answer"]), []

    def submit(self, answer: str) -> str:
        """Submit your answer.

        Args:
            answer: The answer, a number.
        """
        self.submissions.append(str(answer).strip())
        return "Check your answer and submit it again." if len(self.submissions) == 1 else "Submitted."

    def get_reward(self) -> float:
        return float(len(self.submissions) >= 2 and self.submissions[1] == self.answer)


def first_submission_correct(environments: list, **kwargs) -> list[float]:
    """The first turn's correctness in the self-correction task (a reward term of weight 0: a metric)."""
    return [float(bool(env.submissions) and env.submissions[0] == env.answer) for env in environments]


def selfcheck_transcript(row: dict, rng: random.Random) -> dict:
    """An SFT row: a first answer that is right half the time, the check, the right answer, its confirmation."""
    from transformers.utils import get_json_schema

    first = row["answer"] if rng.random() < 0.5 else str(int(row["answer"]) + rng.choice([-2, -1, 1, 2]))

    def submit(answer):
        return {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "submit", "arguments": {"answer": answer}}}]}

    return {"messages": row["prompt"] + [submit(first), {"role": "tool", "name": "submit", "content":
                                                         "Check your answer and submit it again."},
                                         submit(row["answer"]), {"role": "tool", "name": "submit",
                                                                 "content": "Submitted."},
                                         {"role": "assistant", "content": row["answer"]}],
            "tools": json.dumps([get_json_schema(SelfCheck.submit)])}


def write_selfcheck_task(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                         hidden_size: int = 128, num_layers: int = 4) -> Path:
    """Write model/, train.jsonl, eval.jsonl and sft.jsonl for the two-turn self-correction task under out_dir:
    additions of numbers up to 12, answered through SelfCheck's submit tool."""
    rng = random.Random(seed)

    def row():
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return {"prompt": [{"role": "user", "content": f"add {a} + {b}"}], "answer": str(a + b)}

    splits = {"train": [row() for _ in range(n_train)], "eval": [row() for _ in range(n_eval)]}
    splits["sft"] = [selfcheck_transcript(r, rng) for r in splits["train"]]
    return _write_tool_task(out_dir, splits, [SelfCheck.submit], hidden_size, num_layers, seed)


def _write_tool_task(out_dir: str | Path, splits: dict[str, list[dict]], tools: list, hidden_size: int,
                     num_layers: int, seed: int) -> Path:
    """The splits as jsonl, and a tiny model whose tokenizer learned the rendered transcripts, ends a turn with
    <|im_end|> and renders tools with CALCULATOR_TEMPLATE."""
    tokenizer = build_tokenizer(ENGLISH)  # renders the transcripts: the tokenizer then learns them whole
    tokenizer.chat_template = CALCULATOR_TEMPLATE
    corpus = [tokenizer.apply_chat_template(r["messages"], tools=tools, tokenize=False) for r in splits["sft"][:500]]
    tokenizer = build_tokenizer(corpus + ENGLISH * 20)
    tokenizer.chat_template, tokenizer.eos_token = CALCULATOR_TEMPLATE, "<|im_end|>"  # a turn ends the reply
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out_dir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    build_tiny_model(tokenizer, out_dir / "model", hidden_size, num_layers, seed)
    return out_dir


def write_arithmetic_task(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                          hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Write model/, train.jsonl, eval.jsonl and sft.jsonl for the addition task under out_dir."""
    rng = random.Random(seed)
    splits = {"train": [arithmetic_row(rng) for _ in range(n_train)], "eval": [arithmetic_row(rng) for _ in range(n_eval)]}
    splits["sft"] = [{"prompt": r["prompt"], "completion": " " + r["answer"]} for r in splits["train"]]
    corpus = [r["prompt"] + " " + r["answer"] for r in splits["train"]]
    return _write_task(out_dir, splits, corpus, hidden_size, num_layers, seed)


def write_chain_task(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                     hidden_size: int = 64, num_layers: int = 2) -> Path:
    """The multi-step addition task (chain_row): train/eval prompts with `answer`, SFT rows showing the work."""
    rng = random.Random(seed)
    splits = {"train": [chain_row(rng) for _ in range(n_train)], "eval": [chain_row(rng) for _ in range(n_eval)]}
    splits["sft"] = [{"prompt": r["prompt"], "completion": r["work"]} for r in splits["train"]]
    return _write_task(out_dir, splits, [r["prompt"] + r["work"] for r in splits["train"]], hidden_size, num_layers,
                       seed)


def _write_task(out_dir: str | Path, splits: dict[str, list[dict]], corpus: list[str], hidden_size: int,
                num_layers: int, seed: int) -> Path:
    """Each split as out_dir/<name>.jsonl, and a tiny model with a tokenizer trained on `corpus` in out_dir/model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out_dir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    build_tiny_model(build_tokenizer(corpus + ENGLISH * 20), out_dir / "model", hidden_size, num_layers, seed)
    return out_dir


def build_tokenizer(corpus: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `corpus`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2,
                     seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama-shaped model with `tokenizer` to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_sort_task(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                    hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Write model/, train.jsonl and eval.jsonl for the sorting task under out_dir."""
    rng = random.Random(seed)
    splits = {"train": [sort_pair(rng) for _ in range(n_train)], "eval": [sort_pair(rng) for _ in range(n_eval)]}
    splits["sft"] = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in splits["train"]]
    corpus = [r["prompt"] + r["chosen"] + r["rejected"] for r in splits["train"]]
    return _write_task(out_dir, splits, corpus, hidden_size, num_layers, seed)
