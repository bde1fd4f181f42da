"""The shape of the code: no import cycle, offline trainers apart from the online package, one place that knows
the methods by name, trainers one level below Trainer with the loop not overridden; and the open registries: a
user's advantage estimator and a user's tracker, each named from a recipe and run by `prefopt train`."""

import ast
import json
from pathlib import Path

import pytest
import torch
from accelerate.tracking import GeneralTracker
from conftest import read_metrics, write_recipe

from prefopt.cli import main
from prefopt.losses.ppo import register_advantage

PACKAGE = Path(__file__).resolve().parent.parent / "prefopt"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each prefopt module -> the prefopt modules it imports, anywhere in it (in functions too). `from a import b`
    is an edge to a.b where that is a module, else to a. A package's __init__ is counted only where a module
    imports the package itself (importing a.b.c runs a/__init__.py too, but re-exports there are not a cycle of
    the code's own design)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges, tree = set(), ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports run only in a type checker
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            edges |= {target for target in targets if target in modules and target != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph[node]
    return seen


def test_the_import_graph_has_no_cycle_and_offline_trainers_import_no_online_code():
    graph = import_graph()
    assert {"prefopt.online.engines", "prefopt.online.sampler", "prefopt.online.experience",
            "prefopt.online.pairs", "prefopt.rewards"} <= set(graph)
    assert cycles(graph) == []
    for offline in ("prefopt.trainers.preference", "prefopt.trainers.reward", "prefopt.trainers.base"):
        online = sorted(m for m in reachable(graph, offline) if m.startswith("prefopt.online"))
        assert online == [], f"{offline} reaches {online}"
    assert not any(m.startswith("prefopt.trainers") for m in reachable(graph, "prefopt.run.directory"))
    assert not any(m.startswith("prefopt.trainers") for m in reachable(graph, "prefopt.recipe"))


def test_only_the_method_registry_compares_a_method_name():
    from prefopt.methods import METHODS

    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "methods.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            names = {c.value for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)}
            if names & set(METHODS) and any("method" in ast.unparse(o) for o in operands):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_online_trainers_subclass_trainer_directly_and_keep_the_loop():
    from prefopt.trainers import (
        OnlinePreferenceTrainer,
        PPOTrainer,
        PreferenceTrainer,
        RewardTrainer,
        Trainer,
    )

    assert OnlinePreferenceTrainer.__bases__ == (Trainer,) and PPOTrainer.__bases__ == (Trainer,)
    for cls in (OnlinePreferenceTrainer, PPOTrainer, PreferenceTrainer, RewardTrainer):
        assert not {"train_step", "fit"} & set(vars(cls)), cls.__name__
    assert "ppo" not in vars(OnlinePreferenceTrainer) and not hasattr(OnlinePreferenceTrainer, "kl_controller")


# ----- a user's estimator and tracker, from prefopt train -------------------------------------------------


@register_advantage(min_group=2, scale="group", aggregation="sequence_mean")
def my_group_baseline(rewards, mask, *, group_size, **_):
    """GRPO's advantage written by a user: each return less its group's mean."""
    groups = rewards.sum(1).view(-1, group_size)
    return (groups - groups.mean(1, keepdim=True)).reshape(-1), None


def my_batch_baseline(rewards, mask, **_):
    """REINFORCE with a batch baseline, undecorated: the defaults (sequence-level, batch scale, token mean)."""
    returns = rewards.sum(1)
    return returns - returns.mean(), None


def rl_sections(advantage: str) -> dict:
    return {"method": "rl", "data": {"train": None, "eval": None, "max_length": 32},
            "rewards": {"function": "prefopt.data.synthetic:sort_scores"},
            "rollout": {"samples_per_prompt": 4, "max_new_tokens": 6},
            "ppo": {"advantage": advantage, "kl_coef": 0.0},
            "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
            "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 3, "save_every": 0}}


@pytest.mark.parametrize("builtin, user", [("grpo", "test_structure:my_group_baseline"),
                                           ("reinforce", "test_structure:my_batch_baseline")])
def test_a_user_estimator_named_in_a_recipe_trains_as_the_builtin_it_copies(sort_task, tmp_path, builtin, user):
    records = {}
    for name, advantage in (("builtin", builtin), ("user", user)):
        sections = rl_sections(advantage)
        sections["data"]["train"] = str(sort_task / "train.jsonl")
        path = write_recipe(tmp_path / f"{name}.yaml", sort_task, tmp_path / name, **sections)
        assert main(["train", str(path)]) in (0, None)
        records[name] = read_metrics(tmp_path / name)
    for a, b in zip(records["builtin"], records["user"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"])
    import yaml

    saved = yaml.safe_load((tmp_path / "user" / "recipe.yaml").read_text())["ppo"]
    builtin_saved = yaml.safe_load((tmp_path / "builtin" / "recipe.yaml").read_text())["ppo"]
    assert (saved["advantage_scale"], saved["loss_aggregation"]) == (builtin_saved["advantage_scale"],
                                                                     builtin_saved["loss_aggregation"])


class FileTracker(GeneralTracker):
    """A user's tracker: every logged value and table, as JSON lines in its logging directory."""

    name = "file_tracker"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.path = Path(logging_dir) / f"{run_name}.tracker.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        self._write({"config": values})

    def log(self, values: dict, step: int | None = None, **kwargs):
        self._write({"step": step, "values": {k: float(v) for k, v in values.items()}})

    def log_table(self, table_name: str, columns: list, data: list, step: int | None = None, **kwargs):
        self._write({"step": step, "table": table_name, "rows": len(data), "columns": columns})

    def _write(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def test_a_user_tracker_named_in_log_to_gets_every_record_and_the_samples(sort_task, tmp_path):
    sections = rl_sections("grpo")
    sections["data"].update(train=str(sort_task / "train.jsonl"), eval=str(sort_task / "eval.jsonl"))
    sections["log"] = {"to": ["test_structure:FileTracker"], "run_name": "mine"}
    sections["train"]["eval_every"] = 2
    out = tmp_path / "run"
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", sort_task, out, **sections))]) in (0, None)
    lines = [json.loads(line) for line in (out / "mine.tracker.jsonl").read_text().splitlines()]
    assert lines[0]["config"]["ppo.advantage"] == "grpo"
    logged = [line for line in lines if "values" in line and "train/loss" in line["values"]]
    assert [line["values"]["train/loss"] for line in logged] == pytest.approx([r["loss"] for r in read_metrics(out)])
    assert any(line.get("table") == "samples" and line["rows"] > 0 for line in lines)
    assert any("eval/score" in line.get("values", {}) for line in lines)
    assert torch.isfinite(torch.tensor([line["values"]["train/loss"] for line in logged])).all()


def test_checks_validate_a_resolved_recipe_and_never_write_into_it(sort_task, tmp_path):
    import copy

    from prefopt import recipe as recipe_lib
    from prefopt.methods import METHODS
    from prefopt.recipe_checks import check

    online = {"method": "online", "rewards": {"function": "prefopt.data.synthetic:sort_scores"},
              "rollout": {"samples_per_prompt": 2}}
    for name, sections in (("dpo", {}), ("rl", rl_sections("grpo")), ("online", online)):
        if name == "rl":
            sections["data"]["train"] = str(sort_task / "train.jsonl")
        recipe = recipe_lib.load(write_recipe(tmp_path / f"{name}.yaml", sort_task, tmp_path / name, **sections))
        resolved = copy.deepcopy(recipe)
        check(recipe, name)
        METHODS[recipe.method].check(recipe, name)
        assert recipe == resolved, name
    assert (recipe.reference.kind, resolved.rewards[0].name) == ("copy", "sort_scores")
