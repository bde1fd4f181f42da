"""Load policies, references and tokenizers with from_pretrained (hub id or local directory)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from prefopt.errors import RecipeError
from prefopt.recipe import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(cfg: ModelConfig, chat_template_kwargs: dict | None = None):
    """The model's tokenizer, with model.chat_template in place of its own (a file or the template itself) and
    data.chat_template_kwargs given to every render of a conversation (prefopt.data.formats.render_chat: the
    training data, rollouts, evaluation, inspect)."""
    from transformers import AutoTokenizer

    check_exists(cfg.name_or_path, "model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise RecipeError(f"model.name_or_path: cannot load a tokenizer from {cfg.name_or_path!r}: "
                          f"{_first_line(exc)}") from None
    if tokenizer.pad_token is None:  # padding is masked out; any id will do, and EOS always exists
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template:
        path = Path(cfg.chat_template).expanduser()
        looks_like_path = "{" not in cfg.chat_template and len(cfg.chat_template) < 4096
        if looks_like_path and not path.is_file():
            raise RecipeError(f"model.chat_template: no such file: {cfg.chat_template} (give a .jinja file, or the "
                              "template itself)")
        tokenizer.chat_template = path.read_text() if looks_like_path else cfg.chat_template
    tokenizer.prefopt_chat_template_kwargs = dict(chat_template_kwargs or {})
    return tokenizer


def load_causal_lm(cfg: ModelConfig, name_or_path: str | None = None, key: str = "model.name_or_path",
                   quantize: bool = False, reward_head: bool = False):
    """A causal LM from the hub or a local directory, with the recipe's dtype, weights via safetensors.

    quantize: 4-bit NF4 weights through bitsandbytes (QLoRA), which needs a CUDA GPU.
    reward_head: the model as a sequence classifier with one output (AutoModelForSequenceClassification,
    num_labels=1): a reward model; a causal LM checkpoint gets a new scalar head.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_exists(name_or_path or cfg.name_or_path, key)
    name_or_path = absolute(name_or_path or cfg.name_or_path)
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code, "use_safetensors": None}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantize:
        kwargs["quantization_config"] = _four_bit_config(cfg)
    auto = AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM
    if reward_head:
        kwargs["num_labels"] = 1
    local = Path(name_or_path)
    if local.is_dir() and not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
        raise RecipeError(f"{key}: {local} holds no weights (model.safetensors, or pytorch_model.bin); was the save "
                          "cut short? Point it at a directory written by save_pretrained")
    try:
        if not cfg.dropout:
            kwargs["config"] = _without_dropout(name_or_path, cfg.trust_remote_code, num_labels=kwargs.pop("num_labels", None))
        model = auto.from_pretrained(name_or_path, **kwargs)
    except Exception as exc:
        kind = "reward model" if reward_head else "causal LM"
        bad = next((f for f in sorted(local.glob("*.safetensors")) if not _readable(f)), None) if local.is_dir() else None
        if bad:
            raise RecipeError(f"{key}: {bad} cannot be read (truncated or corrupt: {_first_line(exc)}); save the "
                              "model again") from None
        raise RecipeError(f"{key}: cannot load a {kind} from {name_or_path!r}: {_first_line(exc)} "
                          "(give a hub id such as Qwen/Qwen2.5-0.5B-Instruct or a directory written by "
                          "save_pretrained)") from None
    if not cfg.dropout:  # dropout layers a config does not name
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    bad = [name for name, param in model.named_parameters()  # (meta: weights another process holds, FSDP2)
           if param.is_floating_point() and not param.is_meta and not torch.isfinite(param).all()]
    if bad:
        raise RecipeError(f"{key}: {name_or_path} holds non-finite values in {len(bad)} weight(s): "
                          f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}; training would give NaN losses "
                          "from the first step. Start from a checkpoint saved before they went bad")
    return model


def check_positions(recipe, length: int, what: str) -> None:
    """Refuse sequences longer than the model has positions for (`length` tokens, described by `what`), before
    any weight loads: past them a model trains on positions it never learned, or fails with an IndexError."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(absolute(recipe.model.name_or_path),
                                            trust_remote_code=recipe.model.trust_remote_code)
    except Exception:  # noqa: BLE001 (load_causal_lm says what is wrong with the model)
        return
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit and length > limit:
        raise RecipeError(f"{what} is longer than {recipe.model.name_or_path}'s max_position_embeddings ({limit}); "
                          f"lower data.max_length (or rollout.max_new_tokens) to fit")


def _readable(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                f.get_tensor(name)
    except Exception:
        return False
    return True


def check_exists(name_or_path: str, key: str) -> None:
    """A path that names a local directory (it starts with . / or ~, or has more than one /) must exist: not
    transformers' "Repo id must be in the form..." for a typo in a path."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise RecipeError(f"{key}: no such directory: {name_or_path} (relative paths start from {Path.cwd()}); give "
                          "a directory written by save_pretrained, or a hub id such as Qwen/Qwen2.5-0.5B-Instruct")


def absolute(name_or_path: str) -> str:
    """A local directory as an absolute path (what a LoRA adapter records as its base, so that it loads from
    anywhere); a hub id as it is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def _without_dropout(name_or_path: str, trust_remote_code: bool, num_labels: int | None):
    """The model's config with every dropout probability it names set to 0 (attention, hidden, embedding,
    classifier: `*dropout*`, GPT-2's `*pdrop`), as TRL does by default: the loss then sees the model it
    scores, and step 1 of DPO is exactly ln 2."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                        **({"num_labels": num_labels} if num_labels else {}))
    for sub in {id(c): c for c in (config, config.get_text_config())}.values():
        for name, value in vars(sub).items():
            if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):
                setattr(sub, name, 0.0)
    return config


def load_policy(cfg: ModelConfig, reward_head: bool = False):
    """The trainable model (a policy, or with reward_head a reward model): all weights, a new LoRA
    adapter, or a saved adapter to continue."""
    model = load_causal_lm(cfg, quantize=cfg.load_in_4bit, reward_head=reward_head)
    if cfg.lora is None and cfg.adapter is None:
        return model
    import peft

    if cfg.load_in_4bit:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.adapter is not None:
        try:
            return peft.PeftModel.from_pretrained(model, cfg.adapter, is_trainable=True)
        except Exception as exc:
            raise RecipeError(f"model.adapter: cannot load a PEFT adapter from {cfg.adapter!r}: "
                              f"{_first_line(exc)}") from None
    lora = cfg.lora
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules,
                             task_type="SEQ_CLS" if reward_head else "CAUSAL_LM")  # SEQ_CLS trains the head too
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules not found in the model
        raise RecipeError(f"model.lora.target_modules: {_first_line(exc)}") from None


def load_reference_copy(cfg: ModelConfig, name_or_path: str | None, key: str = "reference.name_or_path"):
    """A frozen copy of the starting policy: another checkpoint, the base, or the base plus the adapter
    being continued (merged: a reference never trains)."""
    model = load_causal_lm(cfg, name_or_path, key=key)
    if cfg.adapter is not None and name_or_path is None:
        import peft

        model = peft.PeftModel.from_pretrained(model, cfg.adapter).merge_and_unload()
    return freeze(model)


def check_same_tokenizer(tokenizer, name_or_path: str, key: str, trust_remote_code: bool = False,
                         token_map: str = "same"):
    """A model whose log-probs are compared token by token with the trained one's (a distillation teacher) must
    share its tokenizer: every token's id. With token_map "by_text", its vocabulary may hold the student's tokens
    under other ids: returns the (student vocabulary,) tensor of the teacher's id of each student token (the same
    token text; the special tokens eos, bos, pad and unk by role), or None when the ids are the same anyway."""
    import torch
    from transformers import AutoTokenizer

    check_exists(name_or_path, key)
    other = AutoTokenizer.from_pretrained(absolute(name_or_path), trust_remote_code=trust_remote_code)
    mine, theirs = tokenizer.get_vocab(), other.get_vocab()
    if mine == theirs:
        return None
    if token_map != "by_text":
        differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda item: item[1])[:3]
        raise RecipeError(f"{key}: the tokenizer of {name_or_path} is not the student's ({len(theirs)} tokens against "
                          f"{len(mine)}; differing, e.g.: {differ}): distillation compares the two models' log-probs "
                          "of the same token ids. Give a teacher with the student's tokenizer, or, where the "
                          "teacher's vocabulary holds the student's tokens under other ids, distill.token_map: by_text")
    roles = {getattr(tokenizer, f"{role}_token_id"): getattr(other, f"{role}_token_id")
             for role in ("eos", "bos", "pad", "unk")}
    lut = torch.zeros(max(mine.values()) + 1, dtype=torch.long)
    missing = []
    for token, index in mine.items():
        target = roles.get(index) if roles.get(index) is not None else theirs.get(token)
        if target is None:
            missing.append(token)
        else:
            lut[index] = target
    if missing:
        raise RecipeError(f"{key}: distill.token_map by_text maps each student token to the teacher's token of the "
                          f"same text, but {len(missing)} of the student's {len(mine)} tokens are not in the teacher's "
                          f"vocabulary (e.g. {sorted(missing)[:5]}); a teacher with another tokenization is not "
                          "supported")
    return lut


def merge_adapter(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Merge a LoRA run's adapter (run_dir/final) into its base model, saved in Hugging Face format."""
    import peft

    from prefopt import recipe as recipe_lib

    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / "adapter_config.json").exists():
        raise RecipeError(f"{final} holds no LoRA adapter (adapter_config.json); only LoRA runs need merging")
    recipe = recipe_lib.load(run_dir / "recipe.yaml")
    # the base the adapter records (an absolute path or a hub id), so that merging works from any directory
    base_path = json.loads((final / "adapter_config.json").read_text()).get("base_model_name_or_path")
    cfg = dataclasses.replace(recipe.model, name_or_path=base_path or recipe.model.name_or_path)
    base_cfg = dataclasses.replace(cfg, dtype="bfloat16") if cfg.load_in_4bit else cfg  # merge into real weights
    from prefopt.methods import record

    reward_head = record(recipe).reward_model
    base = load_causal_lm(base_cfg, reward_head=reward_head)
    merged = peft.PeftModel.from_pretrained(base, final).merge_and_unload()
    out_dir = Path(out_dir or run_dir / "merged")
    merged.save_pretrained(out_dir)
    load_tokenizer(cfg, recipe.data.chat_template_kwargs).save_pretrained(out_dir)
    for extra in final.glob("*.json"):  # e.g. a reward model's normalization statistics
        if not (out_dir / extra.name).exists() and extra.name != "adapter_config.json":
            shutil.copy(extra, out_dir / extra.name)
    return out_dir


def _four_bit_config(cfg: ModelConfig):
    if not torch.cuda.is_available():
        raise RecipeError("model.load_in_4bit: 4-bit (QLoRA) weights need a CUDA GPU; on this machine drop "
                          "model.load_in_4bit and train the LoRA adapter on full-precision weights")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RecipeError("model.load_in_4bit needs bitsandbytes: pip install 'prefopt[qlora]'") from None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if cfg.dtype in ("bfloat16", "auto") else DTYPES[cfg.dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def freeze(model):
    """A frozen model in evaluation mode: no gradients, no dropout."""
    model.eval()
    model.requires_grad_(False)
    return model


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def decoder_layers(model) -> list:
    """The model's repeated blocks (the classes it names in `_no_split_modules`): the unit of sharding and
    of compilation."""
    names = set(getattr(model, "_no_split_modules", None) or [])  # the class or a base (FSDP2 subclasses it)
    return [module for module in model.modules() if any(cls.__name__ in names for cls in type(module).__mro__)]


class PolicyWithValueHead(nn.Module):
    """The policy, and for GAE a scalar value head on the last hidden state of the policy's backbone or of a
    separate critic model (trained alongside): one module to prepare."""

    def __init__(self, policy, value_head: bool, critic=None):
        super().__init__()
        self.policy, self.critic = policy, critic
        hidden = (critic or policy).config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:  # start from V = 0: the first advantages are the rewards themselves
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    # What Accelerate's FSDP2 preparation asks of a transformers model: the decoder layer classes (each layer
    # one shard unit), the embeddings, and re-tying them after the move to the meta device (else a tied LM head
    # would train as a separate weight)
    @property
    def _no_split_modules(self) -> list[str]:
        return [name for model in (self.policy, self.critic) if model is not None
                for name in getattr(model, "_no_split_modules", None) or []]

    @property
    def config(self):
        return self.policy.config

    def get_input_embeddings(self):
        return self.policy.get_input_embeddings()

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    def tie_weights(self):
        for model in (self.policy, self.critic):
            if model is not None:
                model.tie_weights()

    def forward(self, **inputs):
        """The policy's output (`logits`; hidden states where prefopt.logprobs bypasses the LM head), with
        `critic_values` (N, L) from the value head, or None without one."""
        out = self.policy(**inputs, output_hidden_states=self.value_head is not None and self.critic is None)
        if self.value_head is not None:
            hidden = (out.hidden_states[-1] if self.critic is None  # the last layer's, normed: the LM head's input
                      else self.critic.base_model(**inputs).last_hidden_state)
            out.critic_values = self.value_head(hidden).squeeze(-1).float()
        else:
            out.critic_values = None
        return out

    def save_pretrained(self, path, state_dict=None, **kwargs):
        """The policy in Hugging Face (or PEFT) format; the value head beside it as value_head.pt, and a separate
        critic in critic/. `state_dict`: the whole model's weights, gathered where they are sharded."""
        def part(prefix):
            return None if state_dict is None else {
                k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}

        self.policy.save_pretrained(path, state_dict=part("policy."), **kwargs)
        if self.value_head is not None:
            torch.save(part("value_head.") or self.value_head.state_dict(), f"{path}/value_head.pt")
        if self.critic is not None:
            self.critic.save_pretrained(f"{path}/critic", state_dict=part("critic."))
