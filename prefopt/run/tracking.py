"""The one logging seam of a run: every record goes to metrics.jsonl, to the trackers of `log.to` (Accelerate's
own integrations) and to the console through one call, `RunLog.write`; generated samples go to samples.jsonl and
the trackers through `RunLog.samples`. No metric lives in one sink only.

Tracker keys are `<split>/<metric>` (`train/loss`, `eval/rewards/accuracy`), at the optimizer step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import warnings
from pathlib import Path

from prefopt.errors import PrefoptError, RecipeError
from prefopt.run import metrics as metrics_file
from prefopt.run.checkpoints import writing

# the module each of Accelerate's trackers imports, and the prefopt extra that installs it
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
                   "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive",
                   "swanlab": "swanlab"}
SAMPLES = "samples.jsonl"
_MLFLOW_SET = {"uri": None}  # the tracking URI this process set, for the run directory's file store


def check_trackers(names: list[str]) -> None:
    """Each tracker of log.to is installed; else one error naming what to install."""
    missing = [name for name in names if ":" not in name  # a user's module:Class imports when the run starts
               and importlib.util.find_spec(TRACKER_MODULES.get(name, name)) is None]
    if missing:
        extras = " ".join(f"'prefopt[{name}]'" for name in missing)
        raise RecipeError(f"log.to names {', '.join(missing)}, which is not installed here: pip install {extras} "
                          f"(or remove it from log.to)")


def quiet_libraries() -> None:
    """No weight-loading or shard-writing bars, and no library warnings a user cannot act on (log.quiet)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("accelerate", "torch.distributed.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed sets its logger's level when it loads: a filter stays ("Setting accelerator to CPU" on a CPU)
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    # vLLM reads its level when it loads (an engine server started later inherits it); its warning at each weight
    # sync that a rotary embedding "failed to load weights" is harmless: the cos/sin cache is not a trained weight
    # (Hugging Face checkpoints do not hold it), and vLLM keeps the one it computed
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op.*", category=FutureWarning)
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
        lambda record: not (str(record.args[0] if record.args else "").endswith("RotaryEmbedding")
                            and "Failed to load weights" in str(record.msg)))
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def tracker_note(recipe) -> str | None:
    """What a run writing MLflow's file store in its directory says at start: how to read it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if "mlflow" not in recipe.log.to or uri is None or uri != _MLFLOW_SET["uri"]:
        return None
    return (f"MLflow writes a file store to {uri}; MLflow 3 reads it only with MLFLOW_ALLOW_FILE_STORE=true: "
            f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {uri}")


def tracker_settings(recipe, output_dir: Path) -> tuple[dict, dict]:
    """(Accelerator keyword arguments, init_kwargs of init_trackers) for log.to."""
    from accelerate.utils import ProjectConfiguration

    log = recipe.log
    if not log.to:
        return {}, {}
    # MLflow: a file store in the run directory, unless the environment names a server or store (one that an
    # earlier run in this process set is replaced)
    if "mlflow" in log.to and os.environ.get("MLFLOW_TRACKING_URI") in (None, _MLFLOW_SET["uri"]):
        os.environ["MLFLOW_TRACKING_URI"] = _MLFLOW_SET["uri"] = (output_dir / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use one
    name = log.run_name or output_dir.name
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard"))
    init = {"wandb": {"name": name, "dir": str(output_dir)}, "mlflow": {"run_name": name},
            "trackio": {"name": name}, "comet_ml": {"name": name}, "swanlab": {"experiment_name": name}}
    log_with = [user_tracker(entry, name, output_dir) if ":" in entry else entry for entry in log.to]
    return {"log_with": log_with, "project_config": project}, {k: v for k, v in init.items() if k in log.to}


def user_tracker(reference: str, run_name: str, output_dir: Path):
    """A user's tracker, `module:Class`: a subclass of accelerate.tracking.GeneralTracker, made with those of
    run_name and logging_dir (the run directory) that its __init__ takes."""
    import inspect

    from accelerate.tracking import GeneralTracker

    from prefopt.errors import import_object

    cls = import_object(reference, "log.to")
    if not (isinstance(cls, type) and issubclass(cls, GeneralTracker)):
        raise RecipeError(f"log.to: {reference} is not a subclass of accelerate.tracking.GeneralTracker; write one "
                          "with name, requires_logging_directory, tracker, store_init_configuration and log")
    params = inspect.signature(cls.__init__).parameters
    offered = {"run_name": run_name, "logging_dir": str(output_dir)}
    try:
        return cls(**{key: value for key, value in offered.items() if key in params})
    except Exception as exc:
        raise PrefoptError(f"log.to: {reference} could not be made ({type(exc).__name__}: {exc}); it is called with "
                           "those of run_name= and logging_dir= that its __init__ takes") from exc


def tracker_config(recipe) -> dict[str, object]:
    """The resolved recipe as the run's config: flat keys, values every tracker takes."""
    from prefopt.recipe import flatten

    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)
            for key, value in flatten(recipe.to_dict()).items()}


def headline(record: dict[str, float], keys: tuple[str, ...], limit: int = 6) -> str:
    """The method's headline metrics of a record, `name value` joined; a key ending in `/` stands for the metrics
    directly under it (`rewards/` -> `rewards/correct`, `rewards/format`)."""
    names = []
    for key in keys:
        if key.endswith("/"):
            names += sorted(k for k in record if k.startswith(key) and "/" not in k[len(key) :])
        elif key in record:
            names.append(key)
    names = list(dict.fromkeys(names))[:limit] or [k for k in record if k != "step"][:limit]
    return ", ".join(f"{k} {_format(record[k])}" for k in names)


def _format(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.4f}"


class RunLog:
    """metrics.jsonl, samples.jsonl, the trackers and the console of one run (written by the main process)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.acc, self.recipe, self.out = trainer.accelerator, trainer.recipe, trainer.output_dir
        self.main = self.acc.is_main_process
        self.started = time.perf_counter()
        self.tokens = self.train_seconds = 0.0  # this session's, for the summary
        self.first_step = self.last_step = 0  # the steps this session trains: first_step + 1 ... last_step
        self.last: dict[str, dict] = {}  # the last record of each split

    def start(self, resumed_at: int, init_kwargs: dict) -> None:
        """Drop lines after a resumed checkpoint (they are logged again) and start the trackers."""
        self.first_step = self.last_step = resumed_at
        if self.main:
            for name in ("metrics.jsonl", SAMPLES):
                metrics_file.truncate(self.out / name, resumed_at)
        if self.recipe.log.to:
            try:
                self.acc.init_trackers(self.recipe.log.project, config=tracker_config(self.recipe),
                                       init_kwargs=init_kwargs)
            except Exception as exc:  # a tracker's own error (login, server, store): the run has not started
                self.acc.trackers.clear()
                raise PrefoptError(f"log.to: a tracker failed to start ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}); fix its settings or remove it "
                                   "from log.to") from exc

    def write(self, record: dict[str, float], step: int, split: str) -> None:
        if not record:
            return
        self.last[split] = {"step": step, **record}
        if split == "train":  # a record averages the steps since the last one
            steps, self.last_step = step - self.last_step, step
            self.tokens += record.get("num_tokens", 0.0) * steps
            self.train_seconds += record.get("step_seconds", 0.0) * steps
        if not self.main:
            return
        metrics_file.append(self.out / "metrics.jsonl", record, step, split)
        if self.recipe.log.to:
            self.acc.log({f"{split}/{key}": value for key, value in record.items()}, step=step)
        if split == "eval" or not self.recipe.train.progress_bar:
            self.print(f"[prefopt] {split} step {step}/{self.recipe.train.max_steps}: "
                       f"{headline(record, self.trainer.method.headline)}")

    def samples(self, rows: list[dict], step: int) -> None:
        """Generated samples ({prompt, completion, scores...}) at `step`: samples.jsonl and each tracker."""
        if not (rows and self.main):
            return
        with writing(f"step {step}'s samples", self.out), open(self.out / SAMPLES, "a") as f:
            f.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)
        columns = list(rows[0])
        data = [[row.get(c) for c in columns] for row in rows]
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                table = "\n".join("| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in r) + " |"
                                  for r in [columns, ["---"] * len(columns), *data])
                tracker.writer.add_text("samples", table, global_step=step)
                tracker.writer.flush()
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_text("".join(json.dumps(dict(zip(columns, r))) + "\n" for r in data),
                                f"samples/step-{step}.jsonl")
            elif hasattr(tracker, "log_table"):  # W&B, trackio, Comet, SwanLab, ClearML, a user's own
                tracker.log_table("samples", columns=columns, data=data, step=step)

    def finish(self) -> None:
        """The end-of-run summary (every run, with or without eval data) and the trackers' end."""
        if self.main:
            wall = time.perf_counter() - self.started
            speed = f", {self.tokens / self.train_seconds:,.0f} tokens/s" if self.tokens and self.train_seconds else ""
            self.print(f"[prefopt] done: {self.last_step - self.first_step} steps in {wall:.1f} s{speed}")
            for split in ("train", "eval"):
                if split in self.last:
                    record = self.last[split]
                    self.print(f"[prefopt] last {split} (step {record['step']}): "
                               f"{headline(record, self.trainer.method.headline)}")
            outputs = [name for name in ("metrics.jsonl", SAMPLES, "final", "tensorboard", "mlruns", "wandb")
                       if (self.out / name).exists()]
            self.print(f"[prefopt] outputs in {self.out}: {', '.join(outputs)}")
        self.end()

    def end(self) -> None:
        """End the trackers (once; also after an error). Not Accelerator.end_training, which also destroys the
        process group: the trainer's close() ends that, after ZeRO-3's gathers."""
        for tracker in self.acc.trackers:
            tracker.finish()
        self.acc.trackers.clear()

    @staticmethod
    def print(line: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(line)
