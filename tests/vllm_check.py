"""Runs in the vLLM environment (.venv-vllm; tests/test_vllm.py calls it): GRPO with rollout.engine vllm on a
head_dim-64 model, and what the engine promises. Writes results.json into the directory it is given.

    python tests/vllm_check.py OUT_DIR engine|tools|async|RUN_NAME    (RUN_NAME fsdp2: FSDP2 allowed on CPU processes)
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
START_ENV = dict(os.environ)


def distinct_characters(prompts, completions):
    """A reward a random model's samples differ in."""
    return [len(set(c)) / 10 for c in completions]


def recipe(task: Path, out: Path, **sections) -> dict:
    base = {"method": "rl", "seed": 0, "output_dir": str(out), "model": {"name_or_path": str(task / "model")},
            "data": {"train": str(task / "train.jsonl"), "eval": str(task / "eval.jsonl"), "max_length": 32,
                     "max_prompt_length": 24},
            "rewards": {"function": "vllm_check:distinct_characters"},
            "rollout": {"samples_per_prompt": 4, "max_new_tokens": 8, "engine": "vllm"},
            "ppo": {"advantage": "grpo", "kl_coef": 0.0},
            "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
            "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "log_every": 1, "eval_every": 0,
                      "save_every": 2, "progress_bar": False}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def train(config: dict, *overrides: str) -> list[dict]:
    import yaml

    from prefopt.cli import train_recipe

    path = Path(config["output_dir"] + ".yaml")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")  # each process of a launch writes it: whole, never half
    tmp.write_text(yaml.safe_dump(config))
    os.replace(tmp, path)
    train_recipe(path, list(overrides))
    lines = (Path(config["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def greedy_matches_hf(config: dict) -> dict:
    """After training, a trainer on the final weights: the engine's greedy completions against HF generate's."""
    from prefopt import recipe as recipe_lib
    from prefopt.online.engines import HFEngine
    from prefopt.trainers import PPOTrainer

    final = Path(config["output_dir"]) / "final"
    model = {**config["model"], "name_or_path": str(final)} if not config["model"].get("lora") else {
        **config["model"], "adapter": str(final), "lora": None}
    trainer = PPOTrainer(recipe_lib.from_dict({**config, "model": model, "output_dir": config["output_dir"] + "-eval"}))
    try:
        examples, sampler = trainer.eval_data[:16], trainer.sampler
        engine = sampler.generate(trainer.model, examples)["texts"]
        engine_instance, sampler.engine, sampler.stale = sampler.engine, HFEngine(trainer.tokenizer, temperature=1.0,
                                                                                  top_p=1.0), True
        hf = sampler.generate(trainer.model, examples)["texts"]
        sampler.engine = engine_instance
    finally:
        trainer.close()
    return {"equal": engine == hf, "engine": engine[:4], "hf": hf[:4]}


def judge_checks(task: Path) -> dict:
    """An LLM judge served by vLLM (an engine server of its own) and the same judge in-process (Hugging Face
    greedy): their verdicts."""
    from prefopt.online.served import judge_engine
    from prefopt.recipe_online import JudgeConfig, RewardTerm
    from prefopt.rewards import RewardTerms

    judge = dict(model=str(task / "model"), template="Judge {prompt} {completion}:", parse=r"^(.*)$",
                 max_new_tokens=6)
    prompts, texts = ["add: 1 + 2 =", "add: 3 + 4 =", "add: 9 + 9 ="], [" 3", " 7", " 81"]
    verdicts = {}
    for engine_name in ("hf", "vllm"):
        terms = RewardTerms([RewardTerm(judge=JudgeConfig(**judge, engine=engine_name))], serve_judge=judge_engine)
        try:
            fn = terms.terms[0][2].fn
            verdicts[engine_name] = fn.verdicts(fn.prompts(prompts, [{"completion": t} for t in texts], {}))
        finally:
            terms.close()
    # a teacher served by vLLM (distill.server, distill.engine: vllm) scores tokens as Hugging Face does
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.online.engines import VLLMEngine
    from prefopt.online.server import HFServerEngine

    tokenizer = AutoTokenizer.from_pretrained(task / "model")
    prompts = [tokenizer(p)["input_ids"] for p in prompts]
    completions = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    engine = VLLMEngine(str(task / "model"), seed=0, max_model_len=64, gpu_memory_utilization=0.3,
                        tensor_parallel_size=1, dtype="float32")
    try:
        scored = [engine.score(prompts, completions, 1.0),
                  HFServerEngine(AutoModelForCausalLM.from_pretrained(task / "model")).score(prompts, completions, 1.0)]
    finally:
        engine.close()
    return {**verdicts, "teacher_gap": max(abs(a - b) for x, y in zip(*scored) for a, b in zip(x, y))}


def engine_checks(out: Path, task: Path) -> dict:
    import torch

    from prefopt.errors import TrainingError

    results = {}
    for name, model in (("full", {}), ("lora", {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}})):
        config = recipe(task, out / name, model=model)
        records = train(config)
        results[name] = {"gap_max": max(r["rollout/engine_logp_gap_max"] for r in records),
                         "grad_norms": [r["grad_norm"] for r in records], **greedy_matches_hf(config)}
    # resume: 2 steps, then the same recipe on to 4, against 4 straight (the "full" run)
    config = recipe(task, out / "resumed")
    train(config, "train.max_steps=2")
    resumed = train(config)
    whole = [json.loads(line) for line in (out / "full" / "metrics.jsonl").read_text().splitlines()]
    results["resume"] = {"whole": [r["grad_norm"] for r in whole if r["split"] == "train"],
                         "resumed": [r["grad_norm"] for r in resumed],
                         "lengths": [[r["rollout/length"] for r in rs if r["split"] == "train"]
                                     for rs in (whole, [{**r, "split": "train"} for r in resumed])]}
    # method online (online DPO) samples through the same engine; stopped at 2 and resumed, it repeats itself
    online = {}
    for name, overrides in (("whole", [()]), ("resumed", [("train.max_steps=2",), ()])):
        config = recipe(task, out / f"online-{name}", method="online", loss={"name": "dpo", "beta": 0.1})
        del config["ppo"]
        online[name] = [train(config, *o) for o in overrides][-1]
    results["online"] = {key: [r["loss"] for r in records] for key, records in online.items()}
    results["online"]["pairs"] = [r["pairs/real"] for r in online["whole"]]
    # method distill samples through the engine too: the start as the student, the "full" run's policy the teacher
    config = recipe(task, out / "distill", method="distill", distill={"teacher": str(out / "full" / "final")},
                    rewards={"function": "vllm_check:distinct_characters", "weight": 0.0}, rollout={"temperature": 1.0})
    records = train(config)
    results["distill"] = {"kl": [r["rollout/kl"] for r in records],
                          "gap_max": max(r["rollout/engine_logp_gap_max"] for r in records)}
    # prefopt label --engine vllm: seeded samples, the same on a second call
    from prefopt.labeling import sample

    drawn = [sample(str(task / "model"), ["add: 1 + 2 =", "add: 3 + 4 ="], 3, 8, 1.0, "vllm", seed=7)
             for _ in range(2)]
    results["label"] = {"repeated": drawn[0] == drawn[1], "shape": [len(c) for c in drawn[0]],
                        "distinct": len({c for cs in drawn[0] for c in cs})}
    results["judge"] = judge_checks(task)
    # a sync the engine cannot take: a parameter name it does not know
    from prefopt.online.engines import VLLMEngine

    engine = VLLMEngine(str(task / "model"), seed=0, max_model_len=64, gpu_memory_utilization=0.3,
                        tensor_parallel_size=1, dtype="float32")
    try:
        import time

        start = time.perf_counter()
        engine.load(iter([("model.layers.0.not_a_parameter.weight", torch.zeros(4, 4))]), timeout=60)
        results["bad_sync"] = {"raised": False}
    except TrainingError as exc:
        results["bad_sync"] = {"raised": True, "message": str(exc), "seconds": time.perf_counter() - start}
    finally:
        engine.close()
    return results


def async_checks(out: Path, task: Path) -> dict:
    """rollout.lag 1 with the overlap: on the colocated engine (a background thread generates while the trainer
    updates) 4 steps straight, and 2 then continued to 4, in this process; on a spawned `prefopt serve` vLLM
    server, `prefopt train` killed (-9) after its step-2 checkpoint and run again, against the same command
    uninterrupted (each a process of its own: the engines run here set thread variables of their own)."""
    results = {}
    for name, rollout in (("colocated", {"lag": 1}), ("server", {"lag": 1, "server": "spawn"})):
        runs = {}
        if name == "colocated":
            for run, overrides in (("whole", [()]), ("resumed", [("train.max_steps=2",), ()])):
                config = recipe(task, out / f"async-{name}-{run}", rollout=rollout)
                runs[run] = [train(config, *o) for o in overrides][-1]
        else:
            runs["whole"] = killed_and_rerun(recipe(task, out / "async-server-whole", rollout=rollout), kill=False)
            runs["resumed"] = killed_and_rerun(recipe(task, out / "async-server-killed", rollout=rollout))
        results[name] = {run: [[r[key] for key in ("loss", "grad_norm", "rollout/score", "rollout/is_weight_mean")]
                               for r in records] for run, records in runs.items()}
        results[name]["staleness"] = [r["rollout/staleness"] for r in runs["whole"]]
        results[name]["waited"] = ["timing/wait" in r for r in runs["whole"]]
        results[name]["same_weights"] = same_weights(*(out / f"async-{name}-{run}" / "final" for run in (
            ("whole", "resumed") if name == "colocated" else ("whole", "killed"))))
    return results


def same_weights(a: Path, b: Path) -> bool:
    """Whether two runs' final weights are equal, tensor by tensor."""
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all(bool((first[k] == second[k]).all()) for k in first)


def killed_and_rerun(config: dict, kill: bool = True) -> list[dict]:
    """`prefopt train` in a process of its own, SIGKILLed after its step-2 checkpoint (kill) and run again."""
    import signal
    import subprocess
    import time

    import yaml

    from prefopt.run.checkpoints import complete_checkpoints

    out = Path(config["output_dir"])
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "prefopt", "train", str(path)]
    # the environment this script started with: the engines run in it before set thread variables of their own
    env = {**START_ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    if kill:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
        while not any(step >= 2 for step, _ in complete_checkpoints(out / "checkpoints")):
            assert process.poll() is None, "the run ended before its step-2 checkpoint"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not (out / "final").exists(), "the run finished before the kill"
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True, env=env)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def tool_checks(out: Path) -> dict:
    """Multi-turn rollouts through vLLM: a policy SFT'd on the calculator task's transcripts calls the tool; GRPO
    trains on its trajectories, and the engine's greedy trajectories equal HF generate's."""
    from prefopt.data.synthetic import write_calculator_task

    task = out / "calculator"
    write_calculator_task(task, n_train=400, n_eval=16)  # 128 wide, 4 heads: head_dim 32
    train({"method": "sft", "seed": 0, "output_dir": str(out / "sft"), "model": {"name_or_path": str(task / "model")},
           "data": {"train": str(task / "sft.jsonl"), "max_length": 96, "assistant_only_loss": True},
           "optim": {"lr": 1e-3, "schedule": "constant"},
           "train": {"batch_size": 32, "micro_batch_size": 32, "max_steps": 200, "eval_every": 0, "save_every": 0,
                     "progress_bar": False}})
    config = recipe(task, out / "tools", model={"name_or_path": str(out / "sft" / "final")},
                    data={"max_length": 64, "max_prompt_length": None},
                    rewards={"function": "prefopt.data.synthetic:answer_correct"},
                    rollout={"max_new_tokens": 64, "tools": ["prefopt.data.synthetic:calculator"], "max_turns": 3},
                    train={"max_steps": 2, "save_every": 0})
    records = train(config)
    again = train({**config, "output_dir": str(out / "tools-again")})  # the same seed: the same trajectories
    return {"turns": [r["rollout/turns"] for r in records], "drift": [r["rollout/token_drift"] for r in records],
            "gap_max": max(r["rollout/engine_logp_gap_max"] for r in records),
            "repeated": [[r[key] for r in runs] for runs in (records, again) for key in ("grad_norm",
                                                                                        "rollout/length")],
            **greedy_matches_hf(config)}


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    from prefopt.data.synthetic import write_arithmetic_task

    task = out / "task"
    if not (task / "model").exists():  # vLLM's CPU attention needs head_dim >= 32: hidden 256, 4 heads
        write_arithmetic_task(task, n_train=64, n_eval=16, hidden_size=256, num_layers=2)
    if mode == "engine":
        results = engine_checks(out, task)
    elif mode == "tools":
        results = tool_checks(out)
    elif mode == "async":
        results = async_checks(out, task)
    else:  # one run (of a multi-process launch, perhaps): `mode` names it
        if mode == "fsdp2":
            import fsdp_on_cpu  # noqa: F401  (Accelerate's FSDP allowed on CPU processes, as test_distributed)
        train(recipe(task, out / mode, train={"save_every": 0}))
        results = {}
    if int(os.environ.get("RANK", 0)) == 0:
        (out / f"results-{mode}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
