"""Where the rollout engine runs (`make_engine`): in each training process, or in a process of its own
(`rollout.server`): `prefopt serve MODEL` holds an engine (hf or vllm)
on a copy of the policy and answers over a socket; `ServerEngine` is the trainer's side, an `Engine` like the
others. With `rollout.lag` the trainer then generates the next rollout while it updates (asynchronous RL).

`rollout.server: spawn` starts one server per training process, on its machine; `rollout.server: HOST:PORT`
connects every process to one running server, whose weights the first process sends.

The protocol (multiprocessing.connection: length-prefixed pickles, authenticated with PREFOPT_SERVER_KEY):

- weights: ("tensor", name, tensor) each, then ("commit", count). The server loads them only once all `count`
  have arrived, so it never generates from a half-synced policy; a connection lost meanwhile loses only the
  staged ones. Answer ("ok",) or ("error", text);
- ("generate", prompts, draw, max_new_tokens, sampling) -> ("result", ids, logps): the engine's generate, and each
  sampled token's log-prob under the temperature-scaled distribution (the behaviour policy's);
- while it works the server sends ("alive",) every HEARTBEAT_S seconds: a client that hears nothing for
  SILENT_S seconds, or whose connection closes, ends the run with an error that names the server.
"""

from __future__ import annotations

import os
import pickle
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from multiprocessing.connection import Client, Listener
from pathlib import Path
from types import SimpleNamespace

import torch

from prefopt.errors import PrefoptError, RecipeError, TrainingError
from prefopt.generation import generate, joined, laid_out, local_accelerator
from prefopt.online.engines import Engine, HFEngine, VLLMEngine, policy_weights, vllm_options

HEARTBEAT_S, SILENT_S, START_S = 2.0, 60.0, 600.0
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION")


def server_key() -> bytes:
    return os.environ.get("PREFOPT_SERVER_KEY", "prefopt").encode()


def send(conn, message: tuple) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=5))  # by value (not torch's shared-memory reductions)


def receive(conn) -> tuple:
    return pickle.loads(conn.recv_bytes())


# ----- the server ------------------------------------------------------------------------------------------


class HFServerEngine:
    """Hugging Face generate on the server's own copy of the policy, with the behaviour log-probs."""

    def __init__(self, model):
        self.model = model.eval()
        self.accelerator = local_accelerator(next(model.parameters()).device)

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        try:
            self.model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise PrefoptError(f"the weights sent do not fit the server's model: {str(exc).splitlines()[0]}") from None

    def generate(self, prompts, draw, max_new_tokens, sampling: dict):
        tokenizer = SimpleNamespace(pad_token_id=sampling["pad_token_id"], eos_token_id=sampling["eos_token_id"])
        return generate(self.model, self.accelerator, tokenizer, prompts, max_new_tokens=max_new_tokens, draw=draw,
                        temperature=sampling["temperature"], top_p=sampling["top_p"], logps=True)

    @torch.no_grad()
    def score(self, prompts, completions, temperature: float) -> list[list[float]]:
        """Each completion token's log-prob under the model (logits / temperature), given its prompt."""
        from prefopt.logprobs import response_logps

        batch = joined(prompts, completions, next(self.model.parameters()).device)
        logps = response_logps(self.model, *batch, temperature=temperature)[0].tolist()
        return [row[: len(ids)] for row, ids in zip(logps, completions)]


class VLLMServerEngine:
    """A vLLM engine on the server (its log-probs are the engine's own)."""

    def __init__(self, name_or_path: str, **options):
        from prefopt.online.engines import VLLMEngine

        self.engine = VLLMEngine(name_or_path, **options)

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        self.engine.load(iter(weights.items()))

    def generate(self, prompts, draw, max_new_tokens, sampling: dict):
        engine = self.engine
        engine.temperature, engine.top_p, engine.eos_token_id = (sampling["temperature"], sampling["top_p"],
                                                                 sampling["eos_token_id"])
        return engine.generate(prompts, draw, max_new_tokens)

    def score(self, prompts, completions, temperature: float) -> list[list[float]]:
        return self.engine.score(prompts, completions, temperature)


def serve(engine, host: str = "127.0.0.1", port: int = 0, announce=print) -> None:
    """Answer clients until one sends ("shutdown",): each connection in a thread of its own, the engine's calls one
    at a time in this (the main) thread, where torch's CPU kernels run fastest."""
    listener = Listener((host, port), authkey=server_key())
    announce(f"[prefopt] engine server listening on {listener.address[0]}:{listener.address[1]}")
    jobs: queue.Queue = queue.Queue()
    threading.Thread(target=_accept, args=(listener, jobs), daemon=True).start()
    while (job := jobs.get()) is not None:
        call, answer, done = job
        try:
            answer.append(call(engine))
        except Exception as exc:
            answer.append(("error", f"{type(exc).__name__}: {exc}"))
        done.set()
    listener.close()


def _accept(listener, jobs: queue.Queue) -> None:
    while True:
        try:
            conn = listener.accept()
        except OSError:  # closed
            return
        except Exception:  # a client that failed to authenticate
            continue
        threading.Thread(target=_handle, args=(conn, jobs), daemon=True).start()


def _handle(conn, jobs: queue.Queue) -> None:
    """One client: its weights staged here, its calls queued for the engine, a heartbeat while each waits."""
    staged, sending = {}, threading.Lock()

    def reply(message: tuple) -> None:
        with sending:
            send(conn, message)

    while True:
        try:
            message = receive(conn)
        except (EOFError, OSError):
            return  # the client went: what it staged is dropped
        kind = message[0]
        if kind == "tensor":
            staged[message[1]] = message[2]
            continue
        if kind == "shutdown":
            jobs.put(None)
            reply(("ok",))
            return
        if kind == "commit":
            weights, staged = staged, {}
            call = partial(_commit, weights=weights, count=message[1])
        elif kind == "score":
            call = partial(_score, request=message[1:])
        else:
            call = partial(_generate, request=message[1:])
        answer, done = [], threading.Event()
        jobs.put((call, answer, done))
        try:
            while not done.wait(HEARTBEAT_S):  # the client hears the server is alive while the engine works
                reply(("alive",))
            reply(answer[0])
        except (EOFError, OSError):
            return


def _commit(engine, weights: dict, count: int) -> tuple:
    if count != len(weights):
        raise PrefoptError(f"a sync sent {len(weights)} tensors of {count}")
    engine.load(weights)
    return ("ok",)


def _generate(engine, request: tuple) -> tuple:
    return ("result", *engine.generate(*request))


def _score(engine, request: tuple) -> tuple:
    return ("result", engine.score(*request))


def load_server_engine(kind: str, recipe) -> HFServerEngine | VLLMServerEngine:
    """The engine a server holds: `recipe`'s model, loaded as the trainer loads its policy (without LoRA: the
    trainer sends merged weights)."""
    if kind == "vllm":
        from prefopt.online.engines import vllm_options

        return VLLMServerEngine(recipe.model.name_or_path, **vllm_options(recipe))
    from prefopt.models import load_causal_lm

    model = load_causal_lm(recipe.model)
    if torch.cuda.is_available():
        model = model.to(f"cuda:{torch.cuda.current_device()}")
    return HFServerEngine(model)


def serve_command(args) -> None:
    """`prefopt serve`: an engine server from a model (or a recipe's model and engine) until a client shuts it."""
    from prefopt import recipe as recipe_lib

    if args.recipe:
        recipe = recipe_lib.load(args.recipe)
        kind = recipe.rollout.engine
    elif args.model:
        from prefopt.recipe_online import RolloutConfig

        recipe = SimpleNamespace(model=recipe_lib.ModelConfig(name_or_path=args.model, dtype=args.dtype),
                                 seed=args.seed, data=SimpleNamespace(max_length=args.max_model_len),
                                 rollout=RolloutConfig(engine=args.engine, max_new_tokens=0,
                                                       gpu_memory_utilization=args.gpu_memory_utilization))
        kind = args.engine
    else:
        raise PrefoptError("prefopt serve: give a MODEL (hub id or directory) or --recipe FILE")
    if args.parent:  # started by a trainer (rollout.server: spawn): gone with it, even after a kill -9
        threading.Thread(target=_follow, args=(args.parent,), daemon=True).start()
    serve(load_server_engine(kind, recipe), args.host, args.port, announce=lambda text: print(text, flush=True))


def _follow(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


# ----- the trainer's side ---------------------------------------------------------------------------------


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
        serve = [distill.teacher, "--engine", distill.engine, "--seed", str(recipe.seed), "--dtype",
                 recipe.model.dtype if recipe.model.dtype in ("float32", "bfloat16", "float16") else "float32",
                 "--max-model-len", str(recipe.data.max_length + recipe.rollout.max_new_tokens),
                 "--gpu-memory-utilization", str(recipe.rollout.gpu_memory_utilization)]
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
    serve = [config.model, "--engine", config.engine, "--seed", str(seed), "--gpu-memory-utilization",
             str(config.gpu_memory_utilization)]
    if config.max_model_len:
        serve += ["--max-model-len", str(config.max_model_len)]
    return ServerEngine(sampling, tokenizer, config.server or "spawn", serve=serve)
