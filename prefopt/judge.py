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
    """A judge model on `device`, called as a reward function (by keyword, every column of the rows)."""

    def __init__(self, config, name: str, where: str, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from prefopt.errors import import_object

        self.config, self.name, self.where = config, name, where
        path = Path(config.template)
        self.template = path.read_text() if config.template.endswith((".txt", ".jinja", ".md")) and path.is_file() \
            else config.template
        if "{completion}" not in self.template:
            raise RecipeError(f"{where}.template: the judge's prompt must show the completion: put {{completion}} "
                              "in it (and {prompt}, or any column of the data as {column})")
        self.parse = (import_object(config.parse, f"{where}.parse") if re.fullmatch(r"[\w.]+:\w+", config.parse)
                      else _regex(config.parse, f"{where}.parse"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.model)
            self.model = AutoModelForCausalLM.from_pretrained(config.model).to(device).eval()
        except OSError as exc:
            raise RecipeError(f"{where}.model: cannot load the judge {config.model!r}: {exc}") from None
        self.accelerator = local_accelerator(device)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def prompts(self, prompts: list, completions: list, columns: dict) -> list[list[int]]:
        """The judge's prompt of each completion, as token ids (through its chat template where it has one)."""
        out = []
        for j, (prompt, completion) in enumerate(zip(prompts, completions)):
            values = {key: value[j] for key, value in columns.items() if isinstance(value, list)}
            try:
                text = self.template.format_map({**values, "prompt": _plain(prompt), "completion": _plain(completion)})
            except (KeyError, IndexError, ValueError) as exc:
                raise PrefoptError(f"{self.where}.template: cannot fill {exc} from the row (its columns: "
                                   f"{', '.join(sorted(values))}, and prompt, completion); write a literal brace as "
                                   "{{ or }}") from None
            if self.tokenizer.chat_template:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                         add_generation_prompt=True, return_dict=False)
            else:
                ids = self.tokenizer(text)["input_ids"]
            out.append(list(ids))
        return out

    @torch.no_grad()
    def __call__(self, prompts, completions, log_metric=None, **columns) -> list[float | None]:
        ids, verdicts = self.prompts(prompts, completions, columns), []
        for start in range(0, len(ids), self.config.batch_size):
            out = generate(self.model, self.accelerator, self.tokenizer, ids[start : start + self.config.batch_size],
                           max_new_tokens=self.config.max_new_tokens)
            verdicts += self.tokenizer.batch_decode(out, skip_special_tokens=True)
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
