"""The trainer's side of engine servers (prefopt/online/server.py): `make_engine` puts the recipe's rollout
engine in this process or on a server (`ServerEngine`, an `Engine` like the others; `spawn` starts one), and a
served teacher (`ServedTeacher`) and judge (`judge_engine`) reuse it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Client
from pathlib import Path
from types import SimpleNamespace

import torch

from prefopt.errors import PrefoptError, RecipeError, TrainingError
from prefopt.generation import laid_out
from prefopt.online.engines import Engine, HFEngine, VLLMEngine, policy_weights, vllm_options
from prefopt.online.server import receive, send, server_key

SILENT_S, START_S = 60.0, 600.0  # a server silent this long is gone; one not listening this long after its start
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION")


def make_engine(recipe, tokenizer, main_process: bool = True) -> Engine:
    """The recipe's rollout.engine, in this process or (rollout.server) in an engine server."""
    rollout = recipe.rollout
    if rollout.server:
        return ServerEngine(recipe, tokenizer, rollout.server, main_process)
    if rollout.engine == "hf":
        return HFEngine(tokenizer, temperature=rollout.temperature, top_p=rollout.top_p, logps=rollout.lag > 0)
    if rollout.engine == "vllm":
        return VLLMEngine(recipe.model.name_or_path, temperature=rollout.temperature, top_p=rollout.top_p,
                          eos_token_id=tokenizer.eos_token_id, **vllm_options(recipe))
    if ":" in rollout.engine:  # an engine of the user's: module:Class, made as Class(recipe, tokenizer)
        from prefopt.errors import import_object

        return import_object(rollout.engine, "rollout.engine")(recipe, tokenizer)
    raise RecipeError(f"rollout.engine: unknown engine {rollout.engine!r}; use hf, vllm or module:Class")


class ServerEngine(Engine):
    """An engine in another process: started here (`spawn`) or running at `address` (HOST:PORT). Every call
    waits for its answer, hearing the server's heartbeat; silence or a closed connection is a clear error."""

    gives_logps = True

    def __init__(self, recipe, tokenizer, address: str = "spawn", main_process: bool = True,
                 serve: list[str] | None = None):
        """`serve`: the `prefopt serve` arguments a spawned server takes (None: the recipe's model and engine)."""
        rollout = recipe.rollout
        self.sampling = {"temperature": rollout.temperature, "top_p": rollout.top_p,
                         "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        self.process, self.log, self.sends_weights = None, None, main_process or address == "spawn"
        if address == "spawn":
            self.process, address, self.log = spawn(recipe, serve)
        host, _, port = address.rpartition(":")
        self.address, self.busy = address, threading.RLock()
        try:
            self.conn = Client((host, int(port)), authkey=server_key())
        except (OSError, ValueError) as exc:
            raise PrefoptError(f"rollout.server: cannot connect to an engine server at {address!r} ({exc}); start "
                               "one with `prefopt serve MODEL --port PORT` or set rollout.server: spawn") from None

    def sync(self, model, accelerator) -> None:
        """Send the trained policy's weights (merged where LoRA, gathered where sharded); one process sends them to
        a shared server. The caller keeps every process out of the engine meanwhile (a barrier)."""
        if not self.sends_weights:
            return
        from prefopt import distributed

        count = 0
        with distributed.generation_weights(model, accelerator):
            for name, tensor in policy_weights(model, accelerator):
                self._send(("tensor", name, tensor.cpu()))
                count += 1
        self._call(("commit", count), "a weight sync")

    def generate(self, prompts, draw, max_new_tokens):
        if draw is not None:
            draw = type(draw)(draw.seed, draw.rows.cpu(), draw.total_rows)
        _, ids, logps = self._call(("generate", prompts, draw, max_new_tokens, self.sampling), "a generation")
        return ids, logps

    def score(self, prompts: list[list[int]], completions: list[list[int]], temperature: float) -> list[list[float]]:
        """Each completion token's log-prob under the served model (a teacher's), given its prompt."""
        return self._call(("score", prompts, completions, temperature), "a scoring")[1]

    def close(self) -> None:
        """Shut a spawned server down (killed if a background generation still holds the connection)."""
        try:
            if self.process is not None and self.busy.acquire(timeout=1.0):
                self._call(("shutdown",), "shutdown", silent_s=10.0)
        except TrainingError:
            pass
        finally:
            self.conn.close()
            if self.process is not None:
                try:
                    if self.process.wait(timeout=30) == 0:
                        shutil.rmtree(self.log.parent, ignore_errors=True)  # its recipe and log: kept after a failure
                except subprocess.TimeoutExpired:
                    self.process.kill()

    def _send(self, message: tuple) -> None:
        try:
            send(self.conn, message)
        except (EOFError, OSError) as exc:
            raise TrainingError(f"{self._who()} closed the connection ({type(exc).__name__}){self._exit()}") from None

    def _call(self, message: tuple, what: str, silent_s: float | None = None) -> tuple:
        with self.busy:
            return self._ask(message, what, SILENT_S if silent_s is None else silent_s)

    def _ask(self, message: tuple, what: str, silent_s: float) -> tuple:
        self._send(message)
        while True:
            try:
                if not self.conn.poll(silent_s):
                    raise TrainingError(f"{self._who()} sent nothing for {silent_s:g} s during {what} (no "
                                        f"heartbeat): it hangs or the network is down{self._exit()}")
                answer = receive(self.conn)
            except (EOFError, OSError) as exc:
                raise TrainingError(f"{self._who()} closed the connection during {what} "
                                    f"({type(exc).__name__}){self._exit()}") from None
            if answer[0] == "alive":
                continue
            if answer[0] == "error":
                raise TrainingError(f"{self._who()} failed {what}: {answer[1]}")
            return answer

    def _who(self) -> str:
        return f"the engine server at {self.address}"

    def _exit(self) -> str:
        if self.process is None or self.process.poll() is None:
            return ""
        return f"; the server process exited with code {self.process.returncode} (its log: {self.log})"


def spawn(recipe, serve: list[str] | None = None) -> tuple[subprocess.Popen, str, Path]:
    """`prefopt serve` on this machine with the recipe's engine and model (or the arguments `serve`): (process,
    HOST:PORT, its log) once it listens."""
    from prefopt import recipe as recipe_lib

    folder = Path(tempfile.mkdtemp(prefix="prefopt-server-"))
    if serve is None:
        (folder / "recipe.yaml").write_text(recipe_lib.dump(recipe))
        serve = ["--recipe", str(folder / "recipe.yaml")]
    log = folder / "server.log"
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_ENV}
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    command = [sys.executable, "-m", "prefopt", "serve", *serve, "--parent", str(os.getpid())]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        text = log.read_text()
        if "listening on " in text:
            return process, text.split("listening on ", 1)[1].split()[0], log
        if process.poll() is not None:
            raise PrefoptError(f"rollout.server: spawn: the engine server exited with code {process.returncode} "
                               f"before listening; its log ({log}) ends:\n{_tail(text)}")
        time.sleep(0.2)
    process.kill()
    raise PrefoptError(f"rollout.server: spawn: the engine server did not listen within {START_S:.0f} s ({log})")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class ServedTeacher:
    """distill.server: the teacher on an engine server (spawned, or running at HOST:PORT), asked for its log-probs
    of the sampled tokens instead of a forward in the trainer: token_logps reads `logps_of`."""

    def __init__(self, recipe, tokenizer):
        distill = recipe.distill
        serve = serve_arguments(distill.teacher, distill.engine, recipe.seed, recipe.rollout.gpu_memory_utilization,
                                recipe.data.max_length + recipe.rollout.max_new_tokens,
                                recipe.model.dtype if recipe.model.dtype in ("float32", "bfloat16", "float16")
                                else "float32")
        self.temperature = recipe.rollout.temperature
        self.engine = ServerEngine(recipe, tokenizer, distill.server, serve=serve)

    def logps_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, W) the teacher's log-probs of the last W tokens of left-padded rows (the completions, with any tool
        tokens between their turns: every attended token is context; the caller masks)."""
        width = mask.shape[1]
        keep = attention_mask.bool().cpu()
        prompts = [row[k].tolist() for row, k in zip(input_ids[:, :-width].cpu(), keep[:, :-width])]
        completions = [row[k].tolist() for row, k in zip(input_ids[:, -width:].cpu(), keep[:, -width:])]
        scored = self.engine.score(prompts, completions, self.temperature)
        return laid_out(scored, width).to(mask.device)

    def close(self) -> None:
        self.engine.close()


def judge_engine(config, tokenizer, seed: int) -> ServerEngine:
    """A judge's engine server (judge.server: spawn or HOST:PORT; judge.engine hf or vllm), greedy verdicts."""
    sampling = SimpleNamespace(rollout=SimpleNamespace(temperature=1.0, top_p=1.0))  # greedy: no draw is given
    serve = serve_arguments(config.model, config.engine, seed, config.gpu_memory_utilization, config.max_model_len)
    return ServerEngine(sampling, tokenizer, config.server or "spawn", serve=serve)


def serve_arguments(model: str, engine: str, seed: int, gpu_share: float, max_len: int | None = None,
                    dtype: str | None = None) -> list[str]:
    """The `prefopt serve` arguments of a spawned teacher or judge server."""
    return [model, "--engine", engine, "--seed", str(seed), "--gpu-memory-utilization", str(gpu_share),
            *(["--max-model-len", str(max_len)] if max_len else []), *(["--dtype", dtype] if dtype else [])]
