"""The peak-memory estimate's dry step (peft validate): largest micro-batch, nothing changed."""

import torch
from tiny import tiny_llama, tiny_tokenizer

from peftcli import memory
from peftcli.data import IGNORE_INDEX
from peftcli.methods import lora


def _examples():
    return [{"input_ids": list(range(5, 5 + n)), "labels": [IGNORE_INDEX] * 2 + list(range(7, 5 + n))} for n in (4, 9, 6, 12)]


def test_largest_micro_batch_takes_the_longest_examples():
    free = memory.largest_micro_batch(_examples(), 2, padding_free=True, pad_id=2)
    assert free["input_ids"].shape == (1, 12 + 9)
    padded = memory.largest_micro_batch(_examples(), 3, padding_free=False, pad_id=2)
    assert padded["input_ids"].shape == (3, 12)
    assert padded["attention_mask"].sum() == 12 + 9 + 6


def test_dry_step_changes_no_weight_and_leaves_no_gradient():
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    lora.apply(model, lora.Config(r=4, alpha=8, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    batch = memory.largest_micro_batch(_examples(), 2, padding_free=True, pad_id=tok.pad_token_id)
    peak = memory.dry_step_peak(model, batch, "bf16")
    assert peak >= sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not model.training  # the tiny model was in eval mode; it is left so
