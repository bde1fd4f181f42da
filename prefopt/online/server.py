"""The engine server: `prefopt serve MODEL` holds an engine (hf or vllm) on a copy of the policy (or a judge, or
a teacher) and answers over a socket; the trainer's side is prefopt/online/served.py. With `rollout.lag` the
trainer then generates the next rollout while it updates (asynchronous RL).

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
import threading
import time
from functools import partial
from multiprocessing.connection import Listener
from types import SimpleNamespace

import torch

from prefopt.errors import PrefoptError
from prefopt.generation import generate, joined, local_accelerator
from prefopt.online.engines import VLLMEngine

HEARTBEAT_S = 2.0  # while it works, the server says it is alive this often


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
