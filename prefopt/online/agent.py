"""Multi-turn, tool-using rollouts, with TRL's contracts (GRPOTrainer's `tools=` and `environment_factory=`).

- `rollout.tools: [module:function, ...]`: plain functions with type hints and Google-style docstrings, sync or
  async; their JSON schemas reach the prompt through the chat template's `tools=`.
- `rollout.environment: module:Factory`, or {name: module:Factory} chosen by each row's `environment` column. An
  environment is TRL's: `reset(**row) -> str | None` (the string is appended to the last user message), its
  public methods are tools, and an optional `get_reward()` is a reward term named after its class. Instances are
  pooled (one per rollout row) and reset for each rollout; reward functions also get `environments=`.

A turn: the engine samples; the reply is parsed (`tokenizer.parse_response` where the tokenizer has a response
template, else the `<tool_call>{...}</tool_call>` and Llama-3.1 JSON forms, else plain text); each tool call runs
(an error, an unknown tool, a timeout: `{"error": ...}` back to the model, counted) and the tool messages go back
as tokens; the engine samples the next turn. It ends at a reply without tool calls, at rollout.max_turns
assistant turns, past rollout.max_tool_calls calls, or when the completion's budget (rollout.max_new_tokens,
counting every token after the prompt) is spent; a tool reply that would overflow the budget is dropped and
the trajectory ends, as TRL does.

Token in, token out: a trajectory is the ids the engine sampled and, between them, the ids of each tool reply
with the template's glue (the suffix its rendering adds after the assistant's turn, up to the next generation
prompt: rendered once per reply on a short conversation ending in the same tool call, as TRL does). It is never
re-rendered from text: a template that drops earlier <think> blocks, or BPE merging across a boundary, would
make the update score tokens the model never sampled. Inserted tokens have tool_mask 0 and leave the loss;
`drift` counts the trained ids that differ from the sampled ones, and must be 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import re
import time
from dataclasses import dataclass, field

import torch

from prefopt.errors import RecipeError, TrainingError, import_object
from prefopt.generation import Draw

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
PROBE_USER = {"role": "user", "content": "x"}


@dataclass
class Trajectories:
    """Each row's prompt ids (rendered with its tools and its environment's observation), its completion ids
    (sampled and inserted), tool_mask (1 on sampled ids), the sampled spans [(start, ids)], the completion as
    TRL's message list, and the counts."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]] = field(default_factory=list)
    tool_mask: list[list[int]] = field(default_factory=list)
    logps: list[list[float]] | None = None  # the engine's log-probs of its sampled ids (0 on inserted ones), or None
    sampled: list[list[tuple[int, list[int]]]] = field(default_factory=list)
    messages: list[list[dict]] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    tool_calls: list[int] = field(default_factory=list)
    tool_errors: list[int] = field(default_factory=list)
    tool_seconds: float = 0.0


class Agent:
    """The tools and environments of a run (rollout.tools, rollout.environment) and the multi-turn loop."""

    def __init__(self, rollout, tokenizer, chat_template_kwargs: dict | None = None):
        self.rollout, self.tokenizer = rollout, tokenizer
        self.template_kwargs = dict(chat_template_kwargs or {})
        self.tools = [import_object(name, "rollout.tools") for name in rollout.tools]
        for name, tool in zip(rollout.tools, self.tools):
            if not callable(tool):
                raise RecipeError(f"rollout.tools: {name} is not callable; a tool is a function with type hints and a "
                                  "Google-style docstring")
        environment = rollout.environment
        self.multi = isinstance(environment, dict)
        names = environment if self.multi else {None: environment} if environment else {}
        self.factories = {key: import_object(value, f"rollout.environment[{key}]" if self.multi else
                                             "rollout.environment") for key, value in names.items()}
        self.pool: dict = {}  # environment name -> instances, one per concurrent rollout row
        self.reward_classes = []  # environment classes with get_reward: a reward term each
        for key, factory in self.factories.items():
            instance = factory()
            if not callable(getattr(instance, "reset", None)):
                raise RecipeError(f"rollout.environment: {names[key]} makes {type(instance).__name__}, which has no "
                                  "reset(**row) method; an environment is TRL's (reset, public methods as tools, "
                                  "optional get_reward)")
            self.pool[key] = [instance]
            if callable(getattr(instance, "get_reward", None)) and type(instance) not in self.reward_classes:
                self.reward_classes.append(type(instance))
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="prefopt-tool")
        self.check_template()

    # ----- start-up checks ------------------------------------------------------------------------

    def check_template(self) -> None:
        """The template must render tools and tool messages, and the same glue whatever came before the call:
        the glue is taken from one short rendering."""
        tokenizer = self.tokenizer
        if tokenizer.chat_template is None:
            raise RecipeError(f"rollout.tools/environment need a chat template; the tokenizer of "
                              f"{tokenizer.name_or_path!r} has none (model.chat_template gives one)")
        name, key, value, reply = "tool_name_a8f3", "arg_key_b9d4", "arg_val_d6e7", "tool_reply_c4f9"
        call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": name, "arguments": {key: value}}}]}
        probe = [{"role": "tool", "name": name, "content": reply}]
        text = self.tokenizer.decode(self._ids([PROBE_USER, call, *probe], add_generation_prompt=False))
        missing = [what for what, mark in (("the call's name", name), ("its arguments", value), ("the tool's reply",
                   reply)) if mark not in text]
        if missing:  # some templates silently drop tool_calls (Llama 3's) or tool messages
            raise RecipeError(f"the chat template of {tokenizer.name_or_path!r} cannot render tool calls: its "
                              f"rendering of a tool call and reply lacks {' and '.join(missing)}. Give a template "
                              "with tool support (model.chat_template)")
        longer = [PROBE_USER, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]
        if self.glue(probe) != self.glue(probe, longer):
            raise RecipeError(
                f"the chat template of {tokenizer.name_or_path!r} renders a tool reply differently after a longer "
                "conversation, so tool replies cannot be inserted as tokens of their own. Give a template that renders "
                "a tool reply the same way wherever it comes (model.chat_template)")

    def glue(self, tool_messages: list[dict], history: list[dict] = ()) -> list[int]:
        """The ids the template puts after an assistant turn that called tools: the tool messages and the next
        generation prompt. Rendered after a short conversation ending in a call of the same tool: the glue starts
        after the end of turn (EOS) closing that call (TRL's rule, which takes the conversation without the reply
        as the prefix, fails where the template renders a last assistant turn differently, as Qwen3's adds an empty
        thought block); a template whose turns do not end in EOS takes TRL's rule."""
        history = list(history) or [PROBE_USER]
        call = history + [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": tool_messages[0].get("name", "probe"), "arguments": {}}}]}]
        after = self._ids(call + tool_messages, add_generation_prompt=True)
        eos = self.tokenizer.eos_token_id
        ends = [i for i, token in enumerate(after) if token == eos]
        closed = sum(token == eos for token in self._ids(history, add_generation_prompt=False))
        if len(ends) > closed:
            return after[ends[closed] + 1 :]
        before = self._ids(call, add_generation_prompt=False)
        if after[: len(before)] != before:
            raise RecipeError(
                f"the chat template of {self.tokenizer.name_or_path!r} is not prefix-preserving: a conversation "
                "rendered with a tool reply does not begin with its rendering before the reply, so tool replies "
                "cannot be inserted as tokens. Give a template that renders earlier turns the same way "
                "(model.chat_template)")
        return after[len(before):]

    def _ids(self, messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      **self.template_kwargs)
        except Exception as exc:
            raise RecipeError(f"the chat template of {self.tokenizer.name_or_path!r} cannot render tool calls and "
                              f"tool messages ({exc}); give one that can (model.chat_template)") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ----- a rollout --------------------------------------------------------------------------------

    def begin(self, rows: list[dict]) -> tuple[list, list[dict], list]:
        """Each row's environment (drawn from the pool and reset with the row), its tools by name and its
        prompt messages (the observation appended to the last user message)."""
        environments, toolboxes, prompts, used = [], [], [], {}
        for row in rows:
            prompt = row["prompt"]
            if not (isinstance(prompt, list) and prompt):
                raise RecipeError("rollout.tools/environment need conversational prompts (message lists): the "
                                  "tools reach the model through the chat template")
            env = None
            if self.factories:
                key = row.get("environment") if self.multi else None
                if key not in self.factories:
                    raise RecipeError(f"a row's environment is {key!r}, not one of rollout.environment's "
                                      f"{sorted(self.factories)}")
                pool = self.pool[key]
                index = used[key] = used.get(key, -1) + 1
                if index == len(pool):
                    pool.append(self.factories[key]())
                env = pool[index]
                observation = env.reset(**{k: v for k, v in row.items() if k not in ("prompt_ids",)
                                           and not (self.multi and k == "environment")})
                if observation is not None:
                    prompt = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + observation}]
            methods = [] if env is None else [getattr(env, name) for name, _ in
                                               inspect.getmembers(type(env), predicate=inspect.isfunction)
                                               if name not in ("reset", "get_reward") and not name.startswith("_")]
            environments.append(env)
            toolboxes.append({tool.__name__: tool for tool in self.tools + methods})
            prompts.append(prompt)
        return environments, toolboxes, prompts

    def run(self, engine, rows: list[dict], draw: Draw | None, max_new_tokens: int, max_prompt: int | None = None
            ) -> tuple[Trajectories, list]:
        """Multi-turn trajectories of `rows` (see the module docstring); returns them and the environments. A
        prompt rendered with its tools and observation longer than `max_prompt` tokens is an error."""
        environments, toolboxes, prompts = self.begin(rows)
        schemas = [list(box.values()) or None for box in toolboxes]
        out = Trajectories([self._ids(p, True, s) for p, s in zip(prompts, schemas)])
        longest = max(map(len, out.prompt_ids))
        if max_prompt is not None and longest > max_prompt:
            raise RecipeError(f"a prompt rendered with its tools (and its environment's observation) is {longest} "
                              f"tokens, over data.max_length ({max_prompt}); the tool schemas count: raise "
                              "data.max_length")
        n = len(rows)
        out.completion_ids, out.tool_mask = [[] for _ in range(n)], [[] for _ in range(n)]
        out.sampled, out.messages = [[] for _ in range(n)], [[] for _ in range(n)]
        out.turns, out.tool_calls, out.tool_errors = [0] * n, [0] * n, [0] * n
        active = list(range(n))
        max_turns = self.rollout.max_turns or 10**9
        max_calls = self.rollout.max_tool_calls if self.rollout.max_tool_calls is not None else 10**9
        turn = 0
        while active:
            active = [i for i in active if len(out.completion_ids[i]) < max_new_tokens]  # a budget left to sample
            if not active:
                break
            budgets = [max_new_tokens - len(out.completion_ids[i]) for i in active]
            turn_draw = None if draw is None else Draw(hash((draw.seed, turn)), draw.rows[active], draw.total_rows)
            sampled, logps = engine.generate([out.prompt_ids[i] + out.completion_ids[i] for i in active], turn_draw,
                                             max(budgets))
            if logps is not None and out.logps is None:
                out.logps = [[] for _ in range(n)]
            going = []
            for j, (i, ids, budget) in enumerate(zip(active, sampled, budgets)):
                ids, before = list(ids[:budget]), out.prompt_ids[i] + out.completion_ids[i]
                if logps is not None:
                    out.logps[i] += list(logps[j][:budget])
                out.sampled[i].append((len(out.completion_ids[i]), ids))
                out.completion_ids[i] += ids
                out.tool_mask[i] += [1] * len(ids)
                out.turns[i] += 1
                message = parse_reply(self.tokenizer, ids, before, list(toolboxes[i].values()) or None)
                out.messages[i].append(message)
                calls = message.get("tool_calls") or []
                if not calls or out.turns[i] >= max_turns or out.tool_calls[i] >= max_calls:
                    continue
                start = time.perf_counter()
                replies = [self.call(toolboxes[i], call, out, i) for call in calls[: max_calls - out.tool_calls[i]]]
                out.tool_seconds += time.perf_counter() - start
                inserted = self.glue(replies)
                if len(out.completion_ids[i]) + len(inserted) > max_new_tokens:
                    continue  # the reply would overflow the completion's budget: dropped, the trajectory ends
                out.messages[i] += replies
                out.completion_ids[i] += inserted
                out.tool_mask[i] += [0] * len(inserted)
                if out.logps is not None:
                    out.logps[i] += [0.0] * len(inserted)
                going.append(i)
            active, turn = going, turn + 1
        return out, environments

    def call(self, toolbox: dict, call: dict, out: Trajectories, i: int) -> dict:
        """One tool call -> its tool message; a failure is {"error": ...}, counted."""
        out.tool_calls[i] += 1
        function = call.get("function") or {}
        name = function.get("name") or call.get("name") or "unknown"
        arguments = function.get("arguments", {})
        try:
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if name not in toolbox:
                raise ValueError(f"Tool {name} not found.")
            result = self.execute(toolbox[name], arguments)
        except (Exception, SystemExit) as exc:  # a tool that exits is an error for the model, not the run's end
            out.tool_errors[i] += 1
            result = {"error": str(exc) or type(exc).__name__}
        return {"role": "tool", "name": name, "content": result if isinstance(result, str) else str(result)}

    def execute(self, tool, arguments: dict):
        """A call, sync or async, bounded by rollout.tool_timeout (a hung call is abandoned, not waited for)."""
        timeout = self.rollout.tool_timeout
        if inspect.iscoroutinefunction(tool):
            def run():
                return asyncio.run(asyncio.wait_for(tool(**arguments), timeout))
        else:
            def run():
                return tool(**arguments)
        try:
            return self.executor.submit(run).result(timeout=timeout)
        except (concurrent.futures.TimeoutError, asyncio.TimeoutError):
            # the hung call keeps its thread; later calls get a fresh pool, not a queue behind it
            self.executor.shutdown(wait=False)
            self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="prefopt-tool")
            raise TimeoutError(f"Tool {getattr(tool, '__name__', tool)} timed out after {timeout} s") from None

    def reward_functions(self) -> list[tuple[str, object]]:
        """(class name, reward function) of each environment class with get_reward (sync or async), called as TRL
        calls it: a rollout scores where its environment is exactly that class, None elsewhere."""
        def make(cls):
            if inspect.iscoroutinefunction(cls.get_reward):
                async def reward(environments, **kwargs):
                    return [await env.get_reward() if type(env) is cls else None for env in environments]
            else:
                def reward(environments, **kwargs):
                    return [env.get_reward() if type(env) is cls else None for env in environments]
            return reward
        return [(cls.__name__, make(cls)) for cls in self.reward_classes]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def parse_reply(tokenizer, ids: list[int], prefix: list[int] | None = None, tools: list | None = None) -> dict:
    """An assistant reply's ids -> {role, content[, tool_calls]}: the tokenizer's own parser where it has a
    response template (TRL's add_response_schema sets one; `prefix`, the ids before the reply, and `tools` type
    its arguments), else the <tool_call> and Llama-3.1 JSON forms, else the text."""
    if getattr(tokenizer, "response_template", None) or getattr(tokenizer, "response_schema", None):
        try:
            options = {}
            if getattr(tokenizer, "response_template", None) is not None and prefix is not None:
                takes = inspect.signature(tokenizer.parse_response).parameters
                options = {"prefix": prefix, **({"tools": tools} if "tools" in takes else {})}
            parsed = tokenizer.parse_response(ids, **options)
            if parsed is not None:
                parsed["content"] = (parsed.get("content") or "").removesuffix(tokenizer.eos_token or "")
                if all(isinstance(c, dict) and "function" in c for c in parsed.get("tool_calls") or []):
                    return parsed
        except (ValueError, TypeError):
            pass
    text = tokenizer.decode(ids, skip_special_tokens=True)
    tagged = tokenizer.decode([t for t in ids if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)])
    calls = []  # <tool_call> may be a special token: looked for with the special tokens kept
    for body in TOOL_CALL.findall(tagged):
        call = _call(body)
        if call is None:
            return {"role": "assistant", "content": text}  # malformed: plain text, as TRL
        calls.append(call)
    if not calls and text.strip().startswith("{"):
        call = _call(text.strip())
        if call is not None:
            return {"role": "assistant", "content": "", "tool_calls": [call]}
    if calls:
        return {"role": "assistant", "content": TOOL_CALL.sub("", tagged).strip(), "tool_calls": calls}
    return {"role": "assistant", "content": text}


def _call(body: str) -> dict | None:
    """{"name": ..., "arguments" (or Llama 3.1's "parameters"): {...}} -> a tool call, or None."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    arguments = value.get("arguments", value.get("parameters")) if isinstance(value, dict) else None
    if not (isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(arguments, dict)):
        return None
    return {"type": "function", "function": {"name": value["name"], "arguments": arguments}}


def drift(trajectories: Trajectories, response_ids: torch.Tensor) -> int:
    """Positions where the trained ids (the rollout's response tensor) differ from what the engine sampled or
    from the inserted tokens: 0 unless something re-rendered or re-laid the tokens."""
    wrong = 0
    for i, ids in enumerate(trajectories.completion_ids):
        trained = response_ids[i, : len(ids)].tolist()
        wrong += sum(a != b for a, b in zip(trained, ids)) + abs(len(ids) - min(len(ids), response_ids.shape[1]))
        for start, sampled in trajectories.sampled[i]:
            wrong += sum(a != b for a, b in zip(trained[start : start + len(sampled)], sampled))
    return wrong


def check_drift(count: int, tokenizer) -> None:
    if count:
        raise TrainingError(f"rollout/token_drift is {count}: the trained ids differ from the sampled ones with the "
                            f"chat template of {tokenizer.name_or_path!r}. This is a bug in prefopt; please report it "
                            "with the template")
