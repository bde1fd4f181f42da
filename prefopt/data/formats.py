"""Row formats -> canonical preference examples.

Accepted rows, as in the wider ecosystem:

- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: the same keys holding lists of `{role, content}` messages,
  rendered to text with the tokenizer's chat template;
- implicit prompt: no `prompt`; `chosen` and `rejected` are full texts or
  conversations sharing a prefix, which becomes the prompt;
- unpaired feedback: `prompt`, `completion` and an optional boolean `label`
  (thumbs up; missing means true, as for SFT data), strings or messages;
- language modelling (SFT): `messages` (a conversation; ShareGPT's
  `conversations` of {from, value} too) or `text`. Every token trains, or with
  data.assistant_only_loss only the assistant turns.

A canonical example is `{"prompt": str, "chosen": str, "rejected": str,
"chat": bool}` (or `"completion": str, "label": bool` for unpaired rows): text
ready to tokenize. `chat` says the text was rendered by a chat template (it
already holds any special tokens the template adds); a rendered example also
holds `full_<key>`, the whole conversation with that completion. An SFT example
that trains the prompt too has an empty prompt and the whole text as its
completion; one that trains the assistant turns only has `spans`, the
character ranges of the whole text that train.
"""

from __future__ import annotations

import json
import os
import re
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


def canonical_unpaired(row: dict[str, Any], tokenizer, assistant_only: bool = False,
                       completion_only: bool = True) -> dict[str, Any]:
    """One unpaired row -> canonical example, or BadRow saying why not. For SFT, `completion_only` false trains
    the prompt too, and `assistant_only` only the assistant turns (of conversations)."""
    _check_field(row, "prompt", allow_empty=True)
    _check_field(row, "completion")
    label = row.get("label", True)
    if not isinstance(label, bool):
        raise BadRow(f"'label' is {type(label).__name__} {label!r:.80}; expected true (thumbs up) or false")
    example = {**render_example(tokenizer, row["prompt"], {"completion": row["completion"]}, _tools(row)),
               "label": label}
    if assistant_only:
        if not example["chat"]:
            _text_not_conversations()
        example["spans"] = assistant_spans(tokenizer, row["prompt"] + row["completion"], _tools(row))
    if not completion_only:  # the whole text is the completion: every token after the first trains
        whole = example.pop("full_completion", example["prompt"] + example["completion"])
        example.update(prompt="", completion=whole)
    return example


def canonical_lm(row: dict[str, Any], tokenizer, assistant_only: bool = False, completion_only: bool = True
                 ) -> dict[str, Any]:
    """A `messages` or `text` row (SFT) -> a canonical example whose whole text is the completion."""
    if "messages" not in row:
        _check_field(row, "text")
        if assistant_only:
            _text_not_conversations()
        return {"prompt": "", "completion": row["text"], "chat": False, "label": True}
    _check_field(row, "messages")
    tools = _tools(row)
    text = render_chat(tokenizer, row["messages"], add_generation_prompt=False, tools=tools)
    example = {"prompt": "", "completion": text, "chat": True, "label": True}
    if assistant_only:
        example["spans"] = assistant_spans(tokenizer, row["messages"], tools)
    return example


def canonical_prompt(row: dict[str, Any], tokenizer) -> dict[str, Any]:
    """A prompt-only row (online methods) -> {"prompt": text, "chat": bool}: messages get the chat template
    with the generation prompt."""
    _check_field(row, "prompt")
    return render_example(tokenizer, row["prompt"], {})


def _text_not_conversations():
    from prefopt.errors import DataError

    raise DataError("data.assistant_only_loss needs conversations (`messages`, or prompt/completion message lists); "
                    "this data holds plain text: set data.assistant_only_loss: false")


def render_example(tokenizer, prompt: Any, completions: dict[str, Any], tools: list | None = None) -> dict[str, Any]:
    """Prompt and completions, all strings or all message lists -> text, with the chat template if messages."""
    kinds = {is_messages(v) for v in (prompt, *completions.values())}
    if len(kinds) > 1:
        raise BadRow(f"mixes plain strings and message lists in prompt/{'/'.join(completions)}; "
                     "use one format per row")
    if not is_messages(prompt):
        return {"prompt": prompt, **completions, "chat": False}
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True, tools=tools)
    out = {"prompt": prompt_text, "chat": True}
    for key, messages in completions.items():
        # the whole conversation, as inference renders it; some templates render the prompt alone otherwise (an
        # empty thought block after the generation prompt): the tokens then split where the two diverge
        full = out[f"full_{key}"] = render_chat(tokenizer, prompt + messages, add_generation_prompt=False,
                                                tools=tools)
        shared = len(os.path.commonprefix([prompt_text, full]))
        out[key] = full[shared:]
    return out


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> str:
    """A conversation as the chat template renders it, with data.chat_template_kwargs."""
    _check_template(tokenizer)
    kwargs = getattr(tokenizer, "prefopt_chat_template_kwargs", {})
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as exc:  # jinja errors: say which row, not a deep traceback
        raise BadRow(f"the tokenizer's chat template failed on these messages: {exc}") from None


def _check_template(tokenizer) -> None:
    from prefopt.errors import DataError

    if tokenizer.chat_template is None:  # one error for the run, not one per row blaming the rows
        raise DataError(f"the data holds conversations (message lists), but the tokenizer of "
                        f"{tokenizer.name_or_path!r} has no chat template. Give one with model.chat_template "
                        "(a .jinja file or the template itself), or give plain-text prompt/chosen/rejected")


GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def assistant_spans(tokenizer, messages: list[dict], tools: list | None = None) -> list[list[int]]:
    """The character ranges of the rendered conversation that train under data.assistant_only_loss.

    A template with {% generation %} markers says them itself (transformers' return_assistant_tokens_mask, as
    TRL). Otherwise each assistant message trains the text it adds after the generation prompt of the
    conversation before it: its content and the template's end of turn (a prefix diff). That needs a template
    that renders a conversation's beginning as a prefix of the whole; one that does not (one that drops earlier
    thinking, say) is refused, naming the fix."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from prefopt.errors import DataError

    if not messages:
        return []
    _check_template(tokenizer)
    kwargs = getattr(tokenizer, "prefopt_chat_template_kwargs", {})
    template = tokenizer.get_chat_template(None, tools)
    if GENERATION.search(template):
        try:
            _, (spans,) = render_jinja_template(conversations=[_without_none(messages)], tools=tools,
                                                chat_template=template, return_assistant_tokens_mask=True,
                                                **{**tokenizer.special_tokens_map, **kwargs})
        except Exception as exc:
            raise BadRow(f"the tokenizer's chat template failed on these messages: {exc}") from None
        return [list(span) for span in spans]
    whole = render_chat(tokenizer, messages, add_generation_prompt=False, tools=tools)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], True, tools) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1], False, tools)
        if not whole.startswith(upto):
            raise DataError(
                f"data.assistant_only_loss: the chat template of {tokenizer.name_or_path!r} renders the conversation "
                f"up to assistant message {i} differently from the start of the whole conversation (it rewrites "
                "earlier turns, e.g. drops their thinking), so the assistant turns cannot be found by rendering "
                "prefixes. Give a template with {% generation %} ... {% endgeneration %} around the assistant's "
                "output (model.chat_template), or set data.assistant_only_loss: false")
        spans.append([len(os.path.commonprefix([before, upto])), len(upto)])
    return spans


def _without_none(messages: list[dict]) -> list[dict]:
    """Messages without the keys whose value is None (a dataset gives every message every key), as
    apply_chat_template normalises them."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _tools(row: dict[str, Any]) -> list | None:
    """The row's `tools` (JSON schemas, or their JSON text), given to the chat template as TRL does."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as exc:
            raise BadRow(f"'tools' is not valid JSON: {exc}") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise BadRow(f"'tools' is {type(tools).__name__} {tools!r:.80}; expected a list of JSON schemas")
    return tools or None


def as_chatml(row: dict[str, Any]) -> dict[str, Any]:
    """ShareGPT messages ({from: human|gpt|system, value}) -> {role, content}, in every message list of a row
    (as TRL's maybe_convert_to_chatml)."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for key, value in row.items():
        if is_messages(value) and any("from" in m or "value" in m for m in value):
            row[key] = [{**{k: v for k, v in m.items() if k not in ("from", "value")},
                         **({"role": roles.get(m["from"], m["from"])} if m.get("from") is not None else {}),
                         **({"content": m["value"]} if m.get("value") is not None else {})} for m in value]
    return row


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
            content = message.get("content") if isinstance(message, dict) else None
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and (isinstance(content, str) or (content is None and message.get("tool_calls")))):
                raise BadRow(f"'{key}'[{i}] is not a {{role: str, content: str}} message (or an assistant message "
                             f"with tool_calls): {message!r:.80}")
        return
    raise BadRow(f"'{key}' is {type(value).__name__} {value!r:.80}; expected a string or a list of "
                 "{role, content} messages")
