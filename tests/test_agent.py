"""Multi-turn, tool-using rollouts: TRL's tools and environments unchanged, the same messages and tool mask as
TRL 1.16's own `_tool_call_loop` on the same scripted replies, and the trained ids exactly the sampled ones
(token drift 0) on Qwen2.5-, Llama-3.1- and Qwen3-style templates."""

import asyncio
import copy
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import tokenizer_zoo

from prefopt.online.agent import Agent, check_drift, drift, parse_reply
from prefopt.recipe_online import RolloutConfig

# ----- what a TRL user writes (no prefopt import) ---------------------------------------------------------


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def divide(a: int, b: int) -> float:
    """Divide one integer by another.

    Args:
        a: The dividend.
        b: The divisor.
    """
    return a / b  # b = 0 raises: the model gets {"error": "division by zero"}


async def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first term.
        b: The second term.
    """
    await asyncio.sleep(0)
    return a + b


def odd(kind: str):
    """A tool that misbehaves.

    Args:
        kind: exit, none or dict.
    """
    if kind == "exit":
        raise SystemExit(3)
    return None if kind == "none" else {"a": [1, 2]}


def wait(seconds: float) -> str:
    """Wait.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "done"


class Counter:
    """A TRL environment: reset with the row, a public method as its tool, a reward of its own."""

    def reset(self, **row):
        self.count, self.target = 0, row["target"]
        return f" Count to {self.target}."

    def increment(self, step: int) -> str:
        """Increment the counter.

        Args:
            step: How much to add.
        """
        self.count += step
        return str(self.count)

    async def get_reward(self) -> float:  # TRL allows an async get_reward (an LLM judge)
        await asyncio.sleep(0)
        return float(self.count == self.target)


TOOLS = f"{__name__}:multiply", f"{__name__}:divide", f"{__name__}:add", f"{__name__}:wait", f"{__name__}:odd"


def call(name: str, style: str, **arguments) -> str:
    import json

    if style == "llama":
        return json.dumps({"name": name, "parameters": arguments})
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def scripts(style: str) -> list[list[str]]:
    """Each row's assistant turns, as the model would write them (an EOS ends each)."""
    return [
        [call("multiply", style, a=6, b=7), "It is 42."],
        [call("divide", style, a=1, b=0), call("add", style, a=2, b=3), "Five."],  # an error, then an async tool
        ["No tool needed."],
        [call("nope", style), "Sorry."],  # an unknown tool
    ]


PROMPTS = [[{"role": "user", "content": text}] for text in
           ("What is 6 times 7?", "Divide 1 by 0, then add 2 and 3.", "Say hi.", "Call a tool that is not there.")]


class ScriptedEngine:
    """An engine that replies from the script: the row is the prompt its input starts with; each call is
    checked to continue exactly the ids of the trajectory so far (token in, token out)."""

    samples_from_trainer = True

    def __init__(self, tokenizer, script, prompt_ids):
        self.tokenizer, self.script, self.prompt_ids = tokenizer, script, prompt_ids
        self.turn = [0] * len(script)
        self.inputs = []

    def row(self, ids):
        (row,) = [r for r, p in enumerate(self.prompt_ids) if ids[: len(p)] == p]
        return row

    def generate(self, prompts, draw, max_new_tokens):
        out = []
        for ids in prompts:
            r = self.row(ids)
            self.inputs.append(list(ids))
            text = self.script[r][self.turn[r]]
            self.turn[r] += 1
            out.append(self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id])
        return [o[:max_new_tokens] for o in out], None


TEMPLATES = {"qwen2_5": ("qwen25", "qwen"), "llama3_1": ("llama3", "llama"), "qwen3": ("qwen25", "qwen")}


@pytest.fixture(scope="module")
def tool_tokenizers(tmp_path_factory):
    """Tokenizers with the real models' tool-calling templates (TRL ships them): Qwen2.5's <tool_call> tags,
    Llama 3.1's JSON calls (and its ipython role), Qwen3's (which drops earlier turns' <think> blocks)."""
    root = tmp_path_factory.mktemp("tool_templates")
    out = {}
    for template, (shape, _) in TEMPLATES.items():
        tokenizer = getattr(tokenizer_zoo, shape)(root / template, template=template)
        if shape == "qwen25":
            tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<tool_call>", "</tool_call>"]})
        out[template] = tokenizer
    return out


def agent_for(tokenizer, **rollout) -> Agent:
    return Agent(RolloutConfig(tools=list(TOOLS), **rollout), tokenizer)


def trl_loop(tokenizer, script, prompts, max_completion_length=256):
    """TRL 1.16 GRPOTrainer._tool_call_loop on a stand-in trainer whose generation replies from the same script
    (the first turn parsed as TRL's _generate parses it)."""
    from trl import GRPOTrainer
    from trl.chat_template_utils import parse_response

    tools = [multiply, divide, add, wait, odd]
    prompt_ids = [tokenizer.apply_chat_template(p, tools=tools, add_generation_prompt=True, tokenize=True,
                                                return_dict=False) for p in prompts]
    engine = ScriptedEngine(tokenizer, script, prompt_ids)
    loop = asyncio.new_event_loop()
    import threading

    threading.Thread(target=loop.run_forever, daemon=True).start()
    stub = SimpleNamespace(
        max_tool_calling_iterations=10, processing_class=tokenizer, _tokenizer=tokenizer, chat_template=None,
        chat_template_kwargs={}, _is_vlm=False, use_vllm=False, max_completion_length=max_completion_length,
        model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096)), environment_factories=None,
        tools=tools, async_loop=loop,
        _sync_tool_dicts=[{t.__name__: t for t in tools if not asyncio.iscoroutinefunction(t)}] * len(prompts),
        _async_tool_dicts=[{t.__name__: t for t in tools if asyncio.iscoroutinefunction(t)}] * len(prompts))
    stub._get_tool_suffix_ids = lambda messages: GRPOTrainer._get_tool_suffix_ids(stub, messages)
    stub._generate_single_turn = lambda ids, *args, **kwargs: (engine.generate(ids, None, 10**6)[0], None)
    first, _ = engine.generate(prompt_ids, None, 10**6)
    completions = [[parse_response(tokenizer, ids, prefix=p, tools=tools)] for ids, p in zip(first, prompt_ids)]
    tool_mask, completions, completion_ids, _, calls, failures, _ = GRPOTrainer._tool_call_loop(
        stub, [list(p) for p in prompts], prompt_ids, [list(ids) for ids in first], completions, None, None, None)
    loop.call_soon_threadsafe(loop.stop)
    return prompt_ids, completion_ids, tool_mask, completions, calls, failures


def ours(tokenizer, script, prompts, **rollout):
    agent = agent_for(tokenizer, **rollout)
    rows = [{"prompt": p} for p in prompts]
    _, _, rendered = agent.begin(rows)
    prompt_ids = [agent._ids(p, True, [multiply, divide, add, wait, odd]) for p in rendered]
    engine = ScriptedEngine(tokenizer, script, prompt_ids)
    out, _ = agent.run(engine, rows, None, rollout.get("max_new_tokens", 256))
    agent.close()
    return out, engine


@pytest.mark.parametrize("template", ["qwen2_5", "llama3_1"])
def test_the_same_messages_ids_and_tool_mask_as_trl(tool_tokenizers, template):
    from trl.chat_template_utils import add_response_schema

    tokenizer = add_response_schema(copy.deepcopy(tool_tokenizers[template]))  # TRL's parser, used by both
    script = scripts(TEMPLATES[template][1])
    prompt_ids, completion_ids, tool_mask, completions, calls, failures = trl_loop(tokenizer, script, PROMPTS)
    out, engine = ours(tokenizer, script, PROMPTS, max_new_tokens=256)
    assert out.prompt_ids == prompt_ids
    assert out.messages == completions
    assert out.completion_ids == completion_ids and out.tool_mask == tool_mask
    assert sum(out.tool_calls) == calls == 4 and sum(out.tool_errors) == failures == 2
    assert out.messages[1][1] == {"role": "tool", "name": "divide", "content": "{'error': 'division by zero'}"}
    assert out.messages[1][3]["content"] == "5" and out.turns == [2, 3, 1, 2]
    # every engine call continued exactly the ids so far: what it sampled is what trains
    for i, ids in enumerate(out.completion_ids):
        assert [x for x in engine.inputs if x[: len(out.prompt_ids[i])] == out.prompt_ids[i]][-1] == \
            out.prompt_ids[i] + ids[: len(ids) - len(out.sampled[i][-1][1])]


def test_the_fallback_parser_reads_qwen_and_llama_calls_as_trl_does(tool_tokenizers):
    """A tokenizer without a response template (most hub repos): the <tool_call> tags and Llama 3.1's JSON."""
    from trl.chat_template_utils import add_response_schema, parse_response

    for template, (_, style) in TEMPLATES.items():
        plain = tool_tokenizers[template]
        assert not getattr(plain, "response_template", None)
        with_schema = add_response_schema(copy.deepcopy(plain))
        prefix = plain.apply_chat_template(PROMPTS[0], tools=[multiply], add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
        for text in [t for script in scripts(style) for t in script]:
            ids = plain(text, add_special_tokens=False)["input_ids"] + [plain.eos_token_id]
            theirs = parse_response(with_schema, ids, prefix=prefix, tools=[multiply])
            assert parse_reply(plain, ids) == theirs == parse_reply(with_schema, ids, prefix, [multiply]), text
    malformed = plain("<tool_call>{not json</tool_call>")["input_ids"]
    assert parse_reply(plain, malformed) == {"role": "assistant",  # plain text, as TRL's fallback
                                             "content": plain.decode(malformed, skip_special_tokens=True)}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_no_token_drift_where_rerendering_would(tool_tokenizers, template):
    """The trained ids are the sampled ones on every template; Qwen3's re-rendering of the same conversation
    writes an empty <think> block into the last turn, so a trainer that re-rendered would score tokens never
    sampled (and, after a later user turn, drop the earlier thinking)."""
    import torch

    tokenizer, style = tool_tokenizers[template], TEMPLATES[template][1]
    script = [["<think>\nI should multiply.\n</think>\n\n" + call("multiply", style, a=6, b=7), "It is 42."]]
    out, _ = ours(tokenizer, script, PROMPTS[:1])
    width = max(map(len, out.completion_ids))
    response = torch.tensor([ids + [0] * (width - len(ids)) for ids in out.completion_ids])
    assert drift(out, response) == 0
    response[0, 1] += 1
    assert drift(out, response) == 2  # a changed token counts where it trains and where it was sampled
    with pytest.raises(Exception, match="token_drift is 2"):
        check_drift(2, tokenizer)
    rerendered = tokenizer.apply_chat_template(PROMPTS[0] + out.messages[0], tools=[multiply, divide, add, wait, odd],
                                               tokenize=True, return_dict=False)
    naive = rerendered[len(out.prompt_ids[0]):]
    if template == "qwen3":  # re-rendered, the last turn gains an empty thought block the model never wrote
        assert naive != out.completion_ids[0]
        empty = "<think>\n\n</think>\n\nIt is 42."
        assert empty in tokenizer.decode(naive) and empty not in tokenizer.decode(out.completion_ids[0])


def test_limits_timeouts_and_budget(tool_tokenizers):
    tokenizer = tool_tokenizers["qwen2_5"]
    slow = [[call("wait", "qwen", seconds=5), "ok"]]
    start = time.perf_counter()
    out, _ = ours(tokenizer, slow, PROMPTS[:1], tool_timeout=0.2)
    assert time.perf_counter() - start < 3 and out.tool_errors == [1]
    assert "timed out after 0.2 s" in out.messages[0][1]["content"]
    hung = [[call("wait", "qwen", seconds=5)] * 10 + ["ok"]]  # more hung calls than the pool's threads
    start = time.perf_counter()
    out, _ = ours(tokenizer, hung, PROMPTS[:1], tool_timeout=0.1, max_new_tokens=4096)
    assert out.tool_errors == [10] and time.perf_counter() - start < 4
    out, _ = ours(tokenizer, [[call("odd", "qwen", kind=k) for k in ("exit", "none", "dict")] + ["ok"]], PROMPTS[:1],
                  max_new_tokens=1024)
    assert [m["content"] for m in out.messages[0] if m["role"] == "tool"] == ["{'error': '3'}", "None",
                                                                             "{'a': [1, 2]}"]
    assert out.tool_errors == [1] and out.turns == [4]  # a tool that exits, or returns no string: the run goes on
    looping = [[call("multiply", "qwen", a=1, b=1)] * 6]
    out, _ = ours(tokenizer, looping, PROMPTS[:1], max_turns=3)
    assert out.turns == [3] and out.tool_calls == [2]  # the third turn's call is not run
    out, _ = ours(tokenizer, looping, PROMPTS[:1], max_tool_calls=1)
    assert out.tool_calls == [1] and out.turns == [2]
    out, _ = ours(tokenizer, looping, PROMPTS[:1], max_new_tokens=40)
    assert len(out.completion_ids[0]) <= 40 and out.tool_mask[0][-1] in (0, 1)


def test_an_environment_as_trl_defines_it(tool_tokenizers):
    tokenizer = tool_tokenizers["qwen2_5"]
    agent = Agent(RolloutConfig(environment=f"{__name__}:Counter"), tokenizer)
    rows = [{"prompt": PROMPTS[2], "target": 3}, {"prompt": PROMPTS[2], "target": 2}]
    environments, toolboxes, prompts = agent.begin(rows)
    assert prompts[0][-1]["content"] == "Say hi. Count to 3." and list(toolboxes[0]) == ["increment"]
    assert environments[0] is not environments[1]
    prompt_ids = [agent._ids(p, True, list(box.values())) for p, box in zip(prompts, toolboxes)]
    engine = ScriptedEngine(tokenizer, [[call("increment", "qwen", step=3), "Done."]] * 2, prompt_ids)
    out, environments = agent.run(engine, rows, None, 256)
    (name, reward), = agent.reward_functions()
    assert name == "Counter" and asyncio.run(reward(environments=environments)) == [1.0, 0.0]
    again, _, _ = agent.begin(rows)
    assert again == environments and again[0].count == 0  # pooled, reset
    agent.close()


def test_a_template_without_tool_support_is_named(tmp_path):
    from prefopt.errors import RecipeError

    tokenizer = tokenizer_zoo.zephyr(Path(tmp_path) / "zephyr")  # reads message['content'] only
    with pytest.raises(RecipeError, match="zephyr' cannot render tool calls: .* lacks the call's name and its "
                                          "arguments and the tool's reply. Give a template with tool support"):
        agent_for(tokenizer)


def correct(completions, answer, **kwargs) -> list[float]:
    """A TRL reward function: the last assistant message holds the answer (completions are message lists)."""
    return [float(answer_ in turns[-1]["content"]) for turns, answer_ in zip(completions, answer)]


class CalculatorEngine:
    """A run's rollout engine (rollout.engine: test_agent:CalculatorEngine), scripted: a prompt without a tool
    reply yet gets a multiply call, then the answer (a tiny random model would rarely call a tool)."""

    samples_from_trainer = True

    def __init__(self, recipe, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompts, draw, max_new_tokens):
        out = []
        for j, ids in enumerate(prompts):
            replied = "<tool_response>" in self.tokenizer.decode(ids)
            # a seeded "sample": the answer depends on the draw (seed, rollout, turn) and the row, as a real one
            wrong = draw is not None and hash((draw.seed, int(draw.rows[j]))) % 3 == 0
            text = ("It is 41." if wrong else "It is 42.") if replied else call("multiply", "qwen", a=6, b=7)
            out.append((self.tokenizer(text, add_special_tokens=False)["input_ids"] +
                        [self.tokenizer.eos_token_id])[:max_new_tokens])
        return out, None

    def sync(self, model, accelerator):
        pass

    def sleep(self):
        pass

    def close(self):
        pass


@pytest.fixture
def tool_run(tool_tokenizers, tmp_path):
    """A tiny model on the Qwen2.5-template tokenizer, prompts with an `answer`, and a GRPO recipe with the
    multiply tool and the scripted engine (`overrides` update its sections)."""
    import json

    import yaml

    from prefopt.data.synthetic import build_tiny_model

    tokenizer = tool_tokenizers["qwen2_5"]
    build_tiny_model(tokenizer, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())  # the tool schemas take ~600 tokens
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    rows = [{"prompt": PROMPTS[0], "answer": "42"}, {"prompt": PROMPTS[2], "answer": "hi"}] * 4
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(name, **overrides):
        recipe = {"method": "rl", "output_dir": str(tmp_path / name), "model": {"name_or_path": str(tmp_path / "model")},
                  "data": {"train": str(tmp_path / "prompts.jsonl"), "max_length": 700},
                  "rewards": [{"function": "test_agent:correct"}],
                  "rollout": {"samples_per_prompt": 2, "max_new_tokens": 160, "tools": ["test_agent:multiply"],
                              "engine": "test_agent:CalculatorEngine"},
                  "ppo": {"advantage": "grpo", "kl_coef": 0.0}, "optim": {"lr": 1.0e-3, "schedule": "constant"},
                  "train": {"batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "eval_every": 0,
                            "save_every": 0, "progress_bar": False}}
        for key, value in overrides.items():
            recipe[key] = {**recipe[key], **value}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        return tmp_path / f"{name}.yaml"

    return tokenizer, write


def test_a_tool_run_resumes_exactly(tool_run):
    from conftest import assert_same_records, stop_and_continue

    _, write = tool_run
    train = {"max_steps": 4, "save_every": 2}
    whole, resumed = stop_and_continue(write("whole", train=train), write("resumed", train=train))
    assert_same_records(whole, resumed)
    assert any(r["grad_norm"] > 0 for r in whole) and {r["rollout/turns"] for r in whole} == {2}


def test_two_processes_follow_one_with_tools(tool_run, tmp_path):
    """DDP on 2 CPU processes against 1 with double accumulation: each process runs its rows' trajectories
    (tools, glue, tool masks) and the gathered rollout is the one process's."""
    from test_distributed import compare, run_two

    from prefopt.cli import train_recipe

    _, write = tool_run
    data = {"eval": str(tmp_path / "prompts.jsonl")}  # greedy trajectories of held-out prompts, split too
    train_recipe(write("one", data=data, train={"max_steps": 2, "micro_batch_size": 2, "eval_every": 2}))
    out = run_two(["torch.distributed.run", "--nproc_per_node", "2"],
                  write("two", data=data, train={"max_steps": 2, "micro_batch_size": 1, "eval_every": 2}))
    assert "2 process(es) x micro-batch 1" in out
    compare(tmp_path / "one", tmp_path / "two")


def test_grpo_trains_on_tool_trajectories_without_the_tool_tokens(tool_run, tmp_path):
    import json

    from prefopt.api import train

    tokenizer, write = tool_run
    from conftest import read_metrics

    from prefopt.trainers.ppo import PPOTrainer

    loss_tokens = []

    class Recording(PPOTrainer):
        def _rollout(self, cycle):
            super()._rollout(cycle)
            loss_tokens.append(self.buffer.mask.sum(1).tolist())

    train(str(write("run")), trainer=Recording)
    first = read_metrics(tmp_path / "run", timing=True)[0]
    assert first["rollout/turns"] == 2 and first["rollout/tool_calls"] == 1 and first["rollout/tool_errors"] == 0
    assert first["rollout/token_drift"] == 0 and first["timing/tools"] >= 0
    sampled = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1
                  for t in (call("multiply", "qwen", a=6, b=7), "It is 42."))
    assert first["rollout/length"] == sampled  # the model's tokens only, not the tool reply
    assert loss_tokens == [[sampled] * 4] * 2  # and the loss counts those only
    for sample in map(json.loads, (tmp_path / "run" / "samples.jsonl").read_text().splitlines()):
        assert sample["correct"] == float("6 times 7" in sample["prompt"][0]["content"] and
                                          sample["completion"].endswith("It is 42."))


def test_environments_chosen_by_the_rows_environment_column(tool_tokenizers):
    from prefopt.data.synthetic import SelfCheck, first_submission_correct

    tokenizer = tool_tokenizers["qwen2_5"]
    agent = Agent(RolloutConfig(environment={"count": f"{__name__}:Counter",
                                             "check": "prefopt.data.synthetic:SelfCheck"}), tokenizer)
    rows = [{"prompt": PROMPTS[2], "target": 1, "answer": "5", "environment": "count"},
            {"prompt": PROMPTS[2], "target": 1, "answer": "5", "environment": "check"}]
    environments, toolboxes, prompts = agent.begin(rows)
    assert [type(e) for e in environments] == [Counter, SelfCheck]
    assert [list(box) for box in toolboxes] == [["increment"], ["submit"]]
    prompt_ids = [agent._ids(p, True, list(box.values())) for p, box in zip(prompts, toolboxes)]
    script = [[call("increment", "qwen", step=1), "Done."],
              [call("submit", "qwen", answer="4"), call("submit", "qwen", answer="5"), "5"]]
    out, environments = agent.run(ScriptedEngine(tokenizer, script, prompt_ids), rows, None, 512)
    assert out.turns == [2, 3] and out.messages[1][1]["content"] == "Check your answer and submit it again."
    rewards = dict(agent.reward_functions())
    assert asyncio.run(rewards["Counter"](environments=environments)) == [1.0, None]
    assert rewards["SelfCheck"](environments=environments) == [None, 1.0]  # the second submission
    assert first_submission_correct(environments[1:]) == [0.0]
    with pytest.raises(Exception, match="environment is 'nope', not one of"):
        agent.begin([{**rows[0], "environment": "nope"}])
    agent.close()


@pytest.mark.parametrize("method", ["ppo-gae", "online-dpo", "sppo"])
def test_every_online_method_trains_on_trajectories(tool_run, tmp_path, method):
    """PPO with a critic (GAE over the model's tokens, stepping over the tool's), online DPO (pairs of whole
    trajectories) and SPPO: two steps, the tool called in every trajectory, the loss finite and moving."""
    from conftest import read_metrics

    from prefopt.cli import train_recipe

    _, write = tool_run
    sections = {"ppo-gae": {"ppo": {"advantage": "gae"}},
                "online-dpo": {"method": "online", "loss": {"name": "dpo", "beta": 0.1},
                               "pairs": {"select": "best_worst"}, "train": {"batch_size": 2}},
                "sppo": {"method": "online", "loss": {"name": "sppo", "beta": 0.1}, "train": {"batch_size": 4}}}[method]
    path = write("run", **{k: v for k, v in sections.items() if k in ("train", "ppo")})
    if sections.get("method") == "online":
        import yaml

        recipe = yaml.safe_load(path.read_text())
        recipe.pop("ppo")
        recipe.update(method="online", loss=sections["loss"], **({"pairs": sections["pairs"]} if "pairs" in sections
                                                                 else {}))
        path.write_text(yaml.safe_dump(recipe))
    train_recipe(path)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["rollout/turns"] == 2 and r["rollout/token_drift"] == 0 for r in records)
    assert all(r["loss"] == r["loss"] for r in records) and any(r["grad_norm"] > 0 for r in records)


def test_hf_trajectories_depend_on_seed_rollout_and_row_only(tool_tokenizers, tmp_path, monkeypatch):
    """Real sampling (the HF engine's seeded Gumbel draw), each turn 8 tokens and then a tool call: a row's
    trajectory is the same whichever rows share its batch (so N processes sample what one does) and on a rerun
    (a resumed run), and differs between rows and seeds."""
    import json

    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from prefopt.data.synthetic import build_tiny_model
    from prefopt.generation import Draw
    from prefopt.online import agent as agent_module
    from prefopt.online.engines import HFEngine

    tokenizer = tool_tokenizers["qwen2_5"]
    build_tiny_model(tokenizer, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))

    class EightAtATime(HFEngine):
        def generate(self, prompts, draw, max_new_tokens):
            return super().generate(prompts, draw, min(max_new_tokens, 8))

    engine = EightAtATime(tokenizer, temperature=1.0, top_p=1.0)
    engine.sync(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), Accelerator(cpu=True))
    calls = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "multiply", "arguments": {"a": 2, "b": 3}}}]}
    monkeypatch.setattr(agent_module, "parse_reply", lambda tok, ids, prefix, tools: calls if
                        tok.decode(prefix).count("<tool_response>") < 2 else {"role": "assistant", "content": "x"})
    agent = agent_for(tokenizer)
    rows = [{"prompt": p} for p in PROMPTS]

    def run(index, seed):
        out, _ = agent.run(engine, [rows[i] for i in index], Draw(seed, torch.tensor(index), len(rows)), 200)
        return out.completion_ids, out.turns

    whole, turns = run([0, 1, 2, 3], seed=7)
    assert turns == [3, 3, 3, 3] and len({tuple(ids) for ids in whole}) == 4
    assert run([2, 3], seed=7)[0] == whole[2:] and run([0, 1, 2, 3], seed=7)[0] == whole
    assert run([0, 1, 2, 3], seed=8)[0] != whole
    agent.close()
