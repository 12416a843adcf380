"""Tiny random models and tokenizers built inside the tests (seconds on CPU, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: reverse the word sort the letters count add the numbers",
    "the quick brown fox jumps over the lazy dog 0123456789 + - * / = ? ! , . : ; ' \" ( ) [ ]",
    "hello world answer question user assistant system",
]


def tiny_tokenizer(pad: str | None = "eos", vocab_size: int = 320, extra_specials: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE with <s>, </s>, <unk> (+ ChatML markers, + ``extra_specials``), trained on a
    fixed corpus; the ChatML template.

    pad: "eos" (pad token = EOS, like SmolLM2), "own" (a separate <pad>), or None (no pad token).
    """
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + (["<pad>"] if pad == "own" else [])
    specials += list(extra_specials)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if pad == "eos":
        fast.pad_token = fast.eos_token
    elif pad == "own":
        fast.pad_token = "<pad>"
    fast.chat_template = CHATML
    return fast


def tiny_llama_config(tokenizer=None, **overrides) -> LlamaConfig:
    """A 2-layer Llama: hidden 64, 4 heads, 2 key/value heads (grouped-query attention)."""
    vocab = len(tokenizer) if tokenizer is not None else 320
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              pad_token_id=getattr(tokenizer, "pad_token_id", None))
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(tokenizer=None, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random tiny Llama in eval mode (float32)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, **overrides)).eval()


def save_tiny(path: Path, pad: str | None = "eos", seed: int = 0, **overrides) -> Path:
    """Write a tiny Llama + tokenizer as a transformers dir (safetensors) and return the path."""
    tok = tiny_tokenizer(pad)
    model = tiny_llama(tok, seed=seed, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


SORT_ROWS = [{"instruction": "Sort the numbers.", "input": f"{a}, {b}", "output": f"{min(a, b)}, {max(a, b)}"}
             for a, b in [(3, 1), (7, 2), (5, 9), (4, 8)]]


def tiny_run_recipe(tmp_path: Path, model_dir, method: dict, rows=None, eval_rows: bool = False,
                    max_seq_len: int = 128, **train):
    """A validated recipe for a short training run on a tiny model: ``rows`` (default SORT_ROWS)
    written to ``tmp_path/train.jsonl`` (and used as eval data when ``eval_rows``), output in
    ``tmp_path/run``; ``train`` keys override 3 fp32 steps of 2 examples at lr 1e-2, logged every
    step, no eval or checkpoints."""
    from helpers import write_jsonl

    from peftcli.recipe import validate

    path = write_jsonl(Path(tmp_path) / "train.jsonl", rows or SORT_ROWS)
    source = {"path": str(path), "format": "alpaca"}
    return validate({
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "method": method,
        "data": {"train": source, "eval": source if eval_rows else None, "max_seq_len": max_seq_len},
        "train": {"max_steps": 3, "micro_batch_size": 2, "lr": 1e-2, "log_every": 1, "eval_every": 0,
                  "save_every": 0, "mixed_precision": "no", **train},
        "output": {"dir": str(Path(tmp_path) / "run")},
    })
