"""Tokenizers shaped like real ones, built locally with the `tokenizers` library and saved/loaded through
transformers (nothing from the hub):

- llama2: transformers' LlamaTokenizer on a BPE vocabulary trained here: Metaspace "▁" prefix, byte
  fallback, BOS <s> added to plain text, EOS </s> (Llama-1/2, Mistral v0.1, TinyLlama);
- gpt2: byte-level BPE, no BOS, EOS <|endoftext|> (GPT-2, and Qwen/Llama-3 style pre-tokenization);
- zephyr: the llama2 tokenizer with Zephyr's chat template (<|user|>, <|assistant|>, </s> after each turn).
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "Question: What is the capital of France?\nAnswer:\nParis is the capital of France.",
    "The sky is blue and the grass is green. It is a sunny day.",
    "Hello world, this is a tokenizer for tests. Tell me a joke about cats.",
    "sort: 7 2 9 => 2 7 9. Summarize the text below in one sentence.",
    "It is blue. It is green. Why is the sky blue? Because of Rayleigh scattering.",
    "<|user|>\n<|assistant|>\n<|system|>\nYou are a helpful assistant.",
] * 20

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}"
    "\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def llama2(out_dir: Path, chat_template: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # trained on words (as SentencePiece pieces never span a space); LlamaTokenizer encodes with split=False
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)],
                                  show_progress=False)
    backend.train_from_iterator([text.replace("\n", " ") for text in CORPUS], trainer)  # "\n": byte fallback
    saved = json.loads(backend.to_str())["model"]
    vocab, merges = saved["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in saved["merges"]]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                               add_bos_token=True)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def zephyr(out_dir: Path):
    return llama2(out_dir, ZEPHYR_TEMPLATE)


def gpt2(out_dir: Path):
    from transformers import AutoTokenizer

    from prefopt.data.synthetic import build_tokenizer

    build_tokenizer(CORPUS, vocab_size=500).save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def trl_template(name: str) -> str:
    """A chat template TRL ships (trl/chat_templates/<name>.jinja): the real model's, or its training variant
    with {% generation %} markers."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


def with_chat_tokens(tokenizer, out_dir: Path, template: str, tokens: list[str], **special):
    """`tokenizer` with a model's chat tokens added as special tokens, its template, saved and loaded back."""
    from transformers import AutoTokenizer

    tokenizer.add_special_tokens({"additional_special_tokens": tokens, **special})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def qwen25(out_dir: Path, template: str = "qwen2_5_training"):
    """Byte-level BPE with ChatML turns and Qwen2.5's template (EOS <|im_end|>, as the instruct models)."""
    return with_chat_tokens(gpt2(out_dir), out_dir, trl_template(template), ["<|im_start|>"],
                            eos_token="<|im_end|>")


def llama3(out_dir: Path, template: str = "llama3_training"):
    """Byte-level BPE with Llama 3's header tokens and template (BOS <|begin_of_text|>, EOS <|eot_id|>)."""
    return with_chat_tokens(gpt2(out_dir), out_dir, trl_template(template), ["<|start_header_id|>",
                            "<|end_header_id|>"], bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def phi3(out_dir: Path, template: str = "phi3_training"):
    """The SentencePiece-style tokenizer with Phi-3's turn tokens and template."""
    return with_chat_tokens(llama2(out_dir), out_dir, trl_template(template), ["<|system|>", "<|user|>",
                            "<|assistant|>", "<|end|>"])
