"""An online run's prompts (step 1 of docs/ppo.md): data.train, prepared whole (Arrow rows, drawn by a seeded
permutation per epoch) or streamed (data.streaming: the next prompts of the stream), and data.eval; GKD's data
set completions (distill.lmbda < 1)."""

from __future__ import annotations

import torch

from prefopt.data import lacking, load_prompts, rows_at
from prefopt.errors import PrefoptError, RecipeError


class Prompts:
    def __init__(self, recipe, accelerator, tokenizer, evaluating: bool = False):
        data = recipe.data
        self.recipe, self.tokenizer, self.world_size = recipe, tokenizer, accelerator.num_processes
        self.lmbda = recipe.distill.lmbda if recipe.distill is not None else 1.0  # GKD: < 1 mixes in completions
        self.streaming = data.streaming and not evaluating
        with accelerator.main_process_first():  # the first process fills the datasets cache
            self.eval_data = load_prompts(data.eval, tokenizer, data, recipe.seed, "prefopt eval --data" if
                                          evaluating else "data.eval", accelerator.print) if data.eval else []
            if self.streaming:  # read as rollouts go; its position is checkpointed
                from prefopt.data.stream import Stream

                self.train_data = Stream(data.train, tokenizer, data, recipe.seed, "data.train", "prompts",
                                         accelerator.process_index, self.world_size, accelerator.print)
            else:
                self.train_data = self.eval_data if evaluating else load_prompts(
                    data.train, tokenizer, data, recipe.seed, "data.train", accelerator.print,
                    completions=self.lmbda < 1)
        missing = lacking(self.train_data, "data_completion") if self.lmbda < 1 else 0
        if missing:
            raise PrefoptError(f"distill.lmbda {self.lmbda}: {missing} of {len(self.train_data)} rows of data.train "
                               "have no `completion` column, whose completions GKD mixes in; add it (text, or an "
                               "assistant message list for a conversational prompt), or set distill.lmbda: 1")
        self.order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation of train_data)
        self.drawn: tuple = ((), [])  # streaming: the last (cycle, round) drawn and its prompts

    @property
    def checkpointed(self) -> dict:
        """A stream's position."""
        return {"data_stream": self.train_data} if self.streaming else {}

    def check(self, prompts: int, what: str) -> None:
        """A step's `prompts` must exist in data.train and split evenly over the processes."""
        if not self.streaming and len(self.train_data) < prompts:
            raise RecipeError(f"{what} takes {prompts} prompts but data.train has {len(self.train_data)}")
        if prompts % self.world_size:
            raise RecipeError(f"{what}'s {prompts} prompts do not split evenly over {self.world_size} processes")

    def draw(self, cycle: int, round: int, count: int) -> list[dict]:
        """The `count` examples of a rollout's sampling round, over all processes: round 0 the next slice of the
        epoch's seeded permutation of data.train; a further round (dynamic sampling) a seeded sample. Streaming:
        the next `count` prompts of the stream, for every round (drawn once per (cycle, round), in their order)."""
        if self.streaming:
            if self.drawn[0] != (cycle, round):
                self.drawn = ((cycle, round), self.train_data.take(count))
            return self.drawn[1]
        n, seed = len(self.train_data), self.recipe.seed
        if round:
            generator = torch.Generator().manual_seed(hash((seed, cycle, round)) & (2**63 - 1))
            return rows_at(self.train_data, torch.randperm(n, generator=generator)[:count].tolist())
        epoch, index = divmod(cycle, n // count)
        if self.order is None or self.order[0] != epoch:  # the epoch's permutation, drawn once
            self.order = (epoch, torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)))
        return rows_at(self.train_data, self.order[1][index * count : (index + 1) * count].tolist())

    def from_data(self, cycle: int) -> bool:
        """Whether rollout `cycle` takes the data set's completions (GKD's lambda < 1), drawn from (seed, cycle)."""
        if self.lmbda >= 1:
            return False
        generator = torch.Generator().manual_seed(hash((self.recipe.seed, cycle, 29)) & (2**63 - 1))
        return torch.rand(1, generator=generator).item() >= self.lmbda

    def data_completions(self, rows: list[dict], max_new_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
        """The rows' prompts and their data set completions as token ids, tokenized as offline data is (the
        completion ends with EOS where it is text), the completion cut at max_new_tokens."""
        from prefopt.data.formats import render_example
        from prefopt.data.tokenize import tokenize_examples

        data = self.recipe.data
        examples = [render_example(self.tokenizer, row["prompt"], {"completion": row["data_completion"]})
                    for row in rows]
        out, _ = tokenize_examples(examples, self.tokenizer, data.max_length, data.max_prompt_length,
                                   ("completion",), data.truncation)
        bad = next((i for i, row in enumerate(out) if "bad" in row), None)
        if bad is not None:
            raise PrefoptError(f"distill.lmbda: the data set completion of prompt {rows[bad]['prompt']!r:.80} "
                               f"{out[bad]['bad']}")
        return [row["prompt_ids"] for row in out], [row["completion_ids"][:max_new_tokens] for row in out]

    def close(self) -> None:
        if self.streaming:
            self.train_data.close()
