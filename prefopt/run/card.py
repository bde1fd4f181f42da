"""final/README.md: the model card every run writes beside its weights (method and loss, base model, data, the
resolved recipe, the last eval metrics, versions, and how to load it with transformers or peft alone), and
`prefopt push RUN REPO_ID`, which uploads final/ with its card."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from prefopt.errors import PrefoptError

LOADERS = {  # (library, class, what it is) by what final/ holds
    "policy": ("transformers", "AutoModelForCausalLM", "a causal language model"),
    "adapter": ("peft", "AutoPeftModelForCausalLM", "a LoRA adapter on its base model"),
    "reward": ("transformers", "AutoModelForSequenceClassification", "a reward model (one score per sequence)"),
    "reward_adapter": ("peft", "AutoPeftModelForSequenceClassification", "a LoRA reward model"),
}


def run_card(trainer) -> str:
    """The card of a trainer's run: its recipe, last eval record and library versions."""
    import accelerate
    import torch
    import transformers

    from prefopt.run.metrics import read_records

    recipe, path = trainer.recipe, trainer.output_dir / "metrics.jsonl"
    evals = [r for _, r in read_records(path) if r["split"] == "eval"] if path.exists() else []
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__}
    if recipe.model.lora or recipe.model.adapter:
        import peft

        versions["peft"] = peft.__version__
    chat = trainer.tokenizer.chat_template is not None and conversational(recipe)
    return model_card(recipe, trainer.output_dir / "final", evals[-1] if evals else None, versions, chat)


def conversational(recipe) -> bool:
    """Whether the run trained on conversations (its first training source's first row holds message lists)."""
    from prefopt.data.formats import is_messages
    from prefopt.data.sources import load_source, map_columns

    try:
        source = recipe.data.train[0]
        row = map_columns(load_source(source, "data.train[0]"), recipe.data.columns, "data.train[0]")[0]
    except Exception:  # noqa: BLE001 (the card then shows the plain-text snippet)
        return False
    return any(is_messages(row.get(key)) and row.get(key) for key in ("prompt", "chosen", "completion", "messages"))


def model_card(recipe, final: str | Path, metrics: dict[str, float] | None, versions: dict[str, str],
               chat: bool = False) -> str:
    """The card's text; `final` is where the weights are (the load snippet's path), `metrics` the last eval's;
    `chat`: the run trained on conversations, so the snippet prompts through the chat template."""
    from prefopt.methods import record as method_record
    from prefopt.version import __version__

    record = method_record(recipe)
    lora = recipe.model.lora is not None or recipe.model.adapter is not None
    reward = record.reward_model
    kind = ("reward_adapter" if reward else "adapter") if lora else ("reward" if reward else "policy")
    library, cls, what = LOADERS[kind]
    method = record.description
    if "ppo" in record.sections:
        loss = f"ppo (advantage {recipe.ppo.advantage}, loss aggregation {recipe.ppo.loss_aggregation})"
        rewards = ", ".join(term.name or "?" for term in recipe.rewards)
        loss += f"; rewards: {rewards}"
    else:
        loss = " + ".join(f"{term.weight:g} x {term.name}" if term.weight != 1 else term.name for term in recipe.loss)
    data = [f"- train: {', '.join(src.path + (f' ({src.split})' if src.split != 'train' else '') for src in recipe.data.train)}"]
    if recipe.data.eval:
        data.append(f"- eval: {', '.join(src.path for src in recipe.data.eval)}")
    tags = list(dict.fromkeys(["prefopt", recipe.method, *(term.name for term in recipe.loss
                                                            if "loss" in record.sections)]))  # sft: once
    front = {"library_name": library, "base_model": recipe.model.name_or_path, "tags": tags}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(recipe.output_dir).name}", "",
             f"{what.capitalize()} trained by {method} with prefopt {__version__}: {loss}, from "
             f"`{recipe.model.name_or_path}`.", "", "## Data", "", *data, ""]
    if metrics:
        lines += ["## Last evaluation", "", "| metric | value |", "| --- | --- |",
                  *(f"| {key} | {value:.4f} |" for key, value in metrics.items() if key not in ("step", "split")), ""]
    lines += ["## Use", "", f"With {library} alone (no prefopt needed); after `prefopt push`, give the hub repository "
              "id instead of the path:", "", "```python", *usage(kind, str(final), chat), "```", "",
              "## Versions", "", f"- prefopt {__version__}",
              *(f"- {name} {version}" for name, version in versions.items()), "",
              "## Recipe", "", "```yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def usage(kind: str, path: str, chat: bool = False) -> list[str]:
    library, cls, _ = LOADERS[kind]
    module = "peft" if library == "peft" else "transformers"
    lines = [f"from {module} import {cls}", "from transformers import AutoTokenizer", "",
             f"path = {path!r}", "tokenizer = AutoTokenizer.from_pretrained(path)",
             f"model = {cls}.from_pretrained(path{', num_labels=1' if 'Sequence' in cls else ''})"]
    if "Sequence" in cls:
        return lines + ['inputs = tokenizer("Question? An answer.", return_tensors="pt")',
                        "score = model(**inputs).logits[0, 0].item()  # higher is preferred"]
    if chat:  # prompted as it was trained: through the chat template
        lines += ['messages = [{"role": "user", "content": "Question?"}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                  "return_dict=True)"]
    else:
        lines.append('inputs = tokenizer("Question?", return_tensors="pt")')
    return lines + ["output = model.generate(**inputs, max_new_tokens=32)",
                    "print(tokenizer.decode(output[0][inputs['input_ids'].shape[1]:], skip_special_tokens=True))"]


def push(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload RUN/final (weights, tokenizer, README.md) to the hub repository `repo_id`; returns its URL."""
    from huggingface_hub import HfApi

    final = Path(run_dir) / "final"
    if not (final / "README.md").exists():
        raise PrefoptError(f"{final} holds no finished model (no README.md): give a run directory whose training "
                           "ended, e.g. runs/quickstart")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(final), commit_message=f"prefopt: {Path(run_dir).name}")
    except Exception as exc:  # network, login, permissions: the hub's own message, and what to do about it
        raise PrefoptError(f"push to {repo_id} failed: {type(exc).__name__}: {exc}. {_push_advice(exc)}") from None
    return str(url)


def _push_advice(exc: BaseException) -> str:
    """What to do after a failed push: log in only where the hub refused the login."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return "Log in with `hf auth login` (or set HF_TOKEN) with write access to the repository"
    if status == 404:
        return "Check the repository id (owner/name) and that your login may create it"
    chain, error = [], exc
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    network = ("ConnectionError", "ConnectError", "Timeout", "TimeoutError", "ReadTimeout", "OfflineModeIsEnabled",
               "gaierror", "ProxyError", "SSLError")
    if any(type(e).__name__ in network for e in chain) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return ("The hub could not be reached: check the network (and that HF_HUB_OFFLINE is unset), then run the "
                "same command again; nothing was changed on the hub")
    return "Check the repository id and your login (`hf auth whoami`)"
