"""Load policies, references and tokenizers with from_pretrained (hub id or local directory)."""

from __future__ import annotations

import torch

from prefopt.errors import RecipeError
from prefopt.recipe import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise RecipeError(f"model.name_or_path: cannot load a tokenizer from {cfg.name_or_path!r}: "
                          f"{_first_line(exc)}") from None
    if tokenizer.pad_token is None:  # padding is masked out; any id will do, and EOS always exists
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelConfig, name_or_path: str | None = None, key: str = "model.name_or_path"):
    """A causal LM from the hub or a local directory, with the recipe's dtype, weights via safetensors."""
    from transformers import AutoModelForCausalLM

    name_or_path = name_or_path or cfg.name_or_path
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code, "use_safetensors": None}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as exc:
        raise RecipeError(f"{key}: cannot load a causal LM from {name_or_path!r}: {_first_line(exc)} "
                          "(give a hub id such as Qwen/Qwen2.5-0.5B-Instruct or a directory written by "
                          "save_pretrained)") from None


def freeze(model):
    """A frozen model in evaluation mode: no gradients, no dropout."""
    model.eval()
    model.requires_grad_(False)
    return model


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
