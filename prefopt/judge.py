"""LLM judges as reward terms (`rewards: [{judge: {model, template, parse}}]`): a generative reward model reads a
prompt made from the row, the prompt and the completion, writes a verdict (greedy), and a parser turns it into a
score (Zheng et al. 2023, "Judging LLM-as-a-Judge"; Xu et al. 2024, "The Perfect Blend: Redefining RLHF with
Mixture of Judges"). A verdict the parser cannot read scores None (the term does not apply to that completion)
and is counted (`rewards/<name>/unparsed`), never a crash."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from prefopt.errors import PrefoptError, RecipeError
from prefopt.generation import generate, local_accelerator


class Judge:
    """A judge model, called as a reward function (by keyword, every column of the rows): greedy verdicts on the
    judge's engine, Hugging Face generate on `device` by default, or an engine server (`server`: spawn, or
    HOST:PORT) running `engine` (hf or vllm) on the judge apart from the policy's."""

    placeholders = ("completion",)  # what the template must show
    template, pattern = "{prompt}\n{completion}\nScore:", r"(-?\d+(?:\.\d+)?)"  # the defaults

    def __init__(self, config, name: str, where: str, device: str = "cpu", seed: int = 0, serve=None):
        """`serve(config, tokenizer, seed)`: the engine server client of a served judge (judge.server, or engine
        vllm), which online runs give (prefopt.online.served.judge_engine); without it the judge runs here."""
        from transformers import AutoTokenizer

        from prefopt.errors import import_object

        self.config, self.name, self.where = config, name, where
        template, parse = config.template or self.template, config.parse or self.pattern
        path = Path(template)
        self.template = path.read_text() if template.endswith((".txt", ".jinja", ".md")) and path.is_file() \
            else template
        for placeholder in self.placeholders:
            if f"{{{placeholder}}}" not in self.template:
                raise RecipeError(f"{where}.template: the judge's prompt must show {{{placeholder}}} (with "
                                  "{prompt}, and any column of the data as {column})")
        self.parse = (import_object(parse, f"{where}.parse") if re.fullmatch(r"[\w.]+:\w+", parse)
                      else _regex(parse, f"{where}.parse"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        except OSError as exc:
            raise RecipeError(f"{where}.model: cannot load the judge {config.model!r}: {exc}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if config.server or config.engine == "vllm":
            if serve is None:
                raise RecipeError(f"{where}: a served judge (server, or engine vllm) scores the samples of online "
                                  "runs (method rl, online, distill); here it runs in this process: leave server "
                                  "out and set engine: hf")
            self.engine = serve(config, self.tokenizer, seed)
        else:
            self.engine = _HereEngine(config.model, self.tokenizer, device, where)

    def close(self) -> None:
        self.engine.close()

    def prompts(self, prompts: list, fills: list[dict], columns: dict) -> list[list[int]]:
        """The judge's prompt of each row, as token ids (through its chat template where it has one): the template
        filled with the row's columns, its prompt and `fills` (the completion, or the pair)."""
        out = []
        for j, (prompt, fill) in enumerate(zip(prompts, fills)):
            values = {key: value[j] for key, value in columns.items() if isinstance(value, list)}
            try:
                text = self.template.format_map({**values, "prompt": _plain(prompt),
                                                 **{key: _plain(value) for key, value in fill.items()}})
            except (KeyError, IndexError, ValueError) as exc:
                raise PrefoptError(f"{self.where}.template: cannot fill {exc} from the row (its columns: "
                                   f"{', '.join(sorted(values))}, and prompt, {', '.join(fill)}); write a literal "
                                   "brace as {{ or }}") from None
            if self.tokenizer.chat_template:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                         add_generation_prompt=True, return_dict=False)
            else:
                ids = self.tokenizer(text)["input_ids"]
            out.append(list(ids))
        return out

    @torch.no_grad()
    def verdicts(self, ids: list[list[int]]) -> list[str]:
        """Greedy verdicts, batch_size prompts at a time."""
        out = []
        for start in range(0, len(ids), self.config.batch_size):
            generated, _ = self.engine.generate(ids[start : start + self.config.batch_size], None,
                                                self.config.max_new_tokens)
            out += self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return out

    def __call__(self, prompts, completions, log_metric=None, **columns) -> list[float | None]:
        verdicts = self.verdicts(self.prompts(prompts, [{"completion": c} for c in completions], columns))
        scores = [self._score(verdict) for verdict in verdicts]
        if log_metric is not None:
            log_metric(f"rewards/{self.name}/unparsed", sum(s is None for s in scores) / max(1, len(scores)))
        return scores

    def _score(self, verdict: str) -> float | None:
        try:
            value = self.parse(verdict)
            return None if value is None else float(value)
        except (TypeError, ValueError):
            return None


class PairwiseJudge(Judge):
    """pairs.judge as a judge model (method online): P(a beats b) per row from verdicts on a template showing both
    completions. A verdict reads as A or B (the first or the second wins) or a probability in [0, 1] that the first
    does; each pair is judged in both orders and the two averaged (judges favour a position: Zheng et al. 2023,
    Sec. 3.3, "position bias"). A verdict the parser cannot read counts as a tie (0.5): `pairs/judge_unparsed`."""

    placeholders = ("completion_a", "completion_b")
    template = ("Which response answers the prompt better?\nPrompt: {prompt}\nResponse A: {completion_a}\n"
                "Response B: {completion_b}\nAnswer A or B:")
    pattern = r"\b([AB])\b"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unparsed = 0.0  # the share of the last call's verdicts

    def __call__(self, prompts, a, b) -> list[float]:
        fills = [{"completion_a": x, "completion_b": y} for x, y in zip(a, b)]
        fills += [{"completion_a": y, "completion_b": x} for x, y in zip(a, b)]
        verdicts = self.verdicts(self.prompts(list(prompts) * 2, fills, {}))
        wins = [self._win(verdict) for verdict in verdicts]
        self.unparsed = sum(w is None for w in wins) / max(1, len(wins))
        wins = [0.5 if w is None else w for w in wins]
        n = len(a)
        return [(wins[j] + 1 - wins[n + j]) / 2 for j in range(n)]

    def _win(self, verdict: str) -> float | None:
        try:
            value = self.parse(verdict)
        except (TypeError, ValueError):
            return None
        if isinstance(value, str) and value.strip().upper() in ("A", "B"):
            return 1.0 if value.strip().upper() == "A" else 0.0
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return value if 0 <= value <= 1 else None


class _HereEngine:
    """The judge in this process: Hugging Face generate, greedy (the engine interface's generate and close)."""

    def __init__(self, model: str, tokenizer, device: str, where: str):
        from transformers import AutoModelForCausalLM

        try:
            self.model = AutoModelForCausalLM.from_pretrained(model).to(device).eval()
        except OSError as exc:
            raise RecipeError(f"{where}.model: cannot load the judge {model!r}: {exc}") from None
        self.tokenizer, self.accelerator = tokenizer, local_accelerator(device)

    def generate(self, prompts, draw, max_new_tokens):
        return generate(self.model, self.accelerator, self.tokenizer, prompts, max_new_tokens=max_new_tokens), None

    def close(self) -> None:
        """Nothing to shut down."""


def _regex(pattern: str, where: str):
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise RecipeError(f"{where}: {pattern!r} is not a regular expression ({exc}); or give module:function") from None
    if compiled.groups != 1:
        raise RecipeError(f"{where}: {pattern!r} must have one group, the score (e.g. 'Score: (\\d+)')")

    def parse(verdict: str) -> str | None:
        match = compiled.search(verdict)
        return match.group(1) if match else None

    return parse


def _plain(value) -> str:
    """A prompt or completion as text: a message list's contents joined."""
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return str(value)
