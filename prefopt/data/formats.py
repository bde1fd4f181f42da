"""Row formats -> canonical preference examples.

Accepted rows, as in the wider ecosystem:

- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: the same keys holding lists of `{role, content}` messages,
  rendered to text with the tokenizer's chat template;
- implicit prompt: no `prompt`; `chosen` and `rejected` are full texts or
  conversations sharing a prefix, which becomes the prompt;
- unpaired feedback: `prompt`, `completion` and an optional boolean `label`
  (thumbs up; missing means true, as for SFT data), strings or messages.

A canonical example is `{"prompt": str, "chosen": str, "rejected": str,
"chat": bool}` (or `"completion": str, "label": bool` for unpaired rows): text
ready to tokenize. `chat` says the text was rendered by a chat template (it
already holds any special tokens the template adds); a rendered example also
holds `full_<key>`, the whole conversation with that completion.
"""

from __future__ import annotations

import os
from typing import Any


class BadRow(ValueError):
    """A row that cannot be used; the message is the reason, without the row's location."""


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def canonical_pair(row: dict[str, Any], tokenizer) -> dict[str, Any]:
    """One dataset row -> canonical example, or BadRow saying why not."""
    for key in ("chosen", "rejected"):
        _check_field(row, key)
    if row.get("prompt") is None:
        prompt, chosen, rejected = split_shared_prefix(row["chosen"], row["rejected"])
    else:
        _check_field(row, "prompt", allow_empty=True)
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    example = render_example(tokenizer, prompt, {"chosen": chosen, "rejected": rejected})
    if row.get("margin") is not None:  # how much better chosen is (reward models, Llama 2's margin loss)
        margin = row["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise BadRow(f"'margin' is {type(margin).__name__} {margin!r:.80}; expected a number")
        example["margin"] = float(margin)
    return example


def canonical_unpaired(row: dict[str, Any], tokenizer) -> dict[str, Any]:
    """One unpaired row -> canonical example, or BadRow saying why not."""
    _check_field(row, "prompt", allow_empty=True)
    _check_field(row, "completion")
    label = row.get("label", True)
    if not isinstance(label, bool):
        raise BadRow(f"'label' is {type(label).__name__} {label!r:.80}; expected true (thumbs up) or false")
    return {**render_example(tokenizer, row["prompt"], {"completion": row["completion"]}), "label": label}


def canonical_prompt(row: dict[str, Any], tokenizer) -> dict[str, Any]:
    """A prompt-only row (online methods) -> {"prompt": text, "chat": bool}: messages get the chat template
    with the generation prompt."""
    _check_field(row, "prompt")
    return render_example(tokenizer, row["prompt"], {})


def render_example(tokenizer, prompt: Any, completions: dict[str, Any]) -> dict[str, Any]:
    """Prompt and completions, all strings or all message lists -> text, with the chat template if messages."""
    kinds = {is_messages(v) for v in (prompt, *completions.values())}
    if len(kinds) > 1:
        raise BadRow(f"mixes plain strings and message lists in prompt/{'/'.join(completions)}; "
                     "use one format per row")
    if not is_messages(prompt):
        return {"prompt": prompt, **completions, "chat": False}
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    out = {"prompt": prompt_text, "chat": True}
    for key, messages in completions.items():
        # the whole conversation, as inference renders it; some templates render the prompt alone otherwise (an
        # empty thought block after the generation prompt): the tokens then split where the two diverge
        full = out[f"full_{key}"] = render_chat(tokenizer, prompt + messages, add_generation_prompt=False)
        shared = len(os.path.commonprefix([prompt_text, full]))
        out[key] = full[shared:]
    return out


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """A conversation as the chat template renders it, with data.chat_template_kwargs."""
    from prefopt.errors import DataError

    if tokenizer.chat_template is None:  # one error for the run, not one per row blaming the rows
        raise DataError(f"the data holds conversations (message lists), but the tokenizer of "
                        f"{tokenizer.name_or_path!r} has no chat template. Give one with model.chat_template "
                        "(a .jinja file or the template itself), or give plain-text prompt/chosen/rejected")
    kwargs = getattr(tokenizer, "prefopt_chat_template_kwargs", {})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except Exception as exc:  # jinja errors: say which row, not a deep traceback
        raise BadRow(f"the tokenizer's chat template failed on these messages: {exc}") from None


def split_shared_prefix(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Implicit prompt: the longest shared prefix of chosen and rejected (messages or text)."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n and chosen[n - 1] == " ":  # the completion keeps its leading space, as tokenizers expect
            n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise BadRow("has no 'prompt' and chosen/rejected share no prefix to use as the prompt")
    elif is_messages(chosen) and is_messages(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise BadRow("has no 'prompt' and the chosen/rejected conversations share no first message")
    else:
        raise BadRow("has no 'prompt', and chosen/rejected are not both strings or both message lists")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value:
            raise BadRow(f"'{key}' is identical to the shared prefix, leaving an empty completion")
    return prompt, chosen, rejected


def _check_field(row: dict[str, Any], key: str, allow_empty: bool = False) -> None:
    value = row.get(key)
    if value is None:
        raise BadRow(f"'{key}' is missing (None)")
    if isinstance(value, str):
        if not value and not allow_empty:
            raise BadRow(f"'{key}' is an empty string")
        return
    if isinstance(value, list):
        if not value and not allow_empty:
            raise BadRow(f"'{key}' is an empty message list")
        for i, message in enumerate(value):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise BadRow(f"'{key}'[{i}] is not a {{role: str, content: str}} message: {message!r:.80}")
        return
    raise BadRow(f"'{key}' is {type(value).__name__} {value!r:.80}; expected a string or a list of "
                 "{role, content} messages")
