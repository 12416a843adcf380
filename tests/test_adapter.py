"""Bottleneck adapters: identity at init, placement by structure, parameter count, training,
save/load round trip, merge refusal, architectures it cannot handle."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import logits, method_recipe, perturb, saved_adapter
from safetensors.torch import load_file
from tiny import tiny_llama, tiny_run_recipe
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from peftcli import artifacts, merge
from peftcli.errors import UserError
from peftcli.methods import adapter

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])
PEFT = str(Path(sys.executable).with_name("peft"))


def trained(base_dir, adapter_dir, **method_keys):
    """Our adapter on the base, up-projections non-zero (as if trained; zeros is the init),
    saved to ``adapter_dir``; returns the model (eval)."""
    recipe = method_recipe("adapter", base_dir, **method_keys)
    return saved_adapter(recipe, adapter_dir, lambda model: perturb(model, ["adapter_up"]))


# ---------------------------------------------------------------------------------------------
# placement and initialisation


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_identity_at_init(variant):
    expected = logits(tiny_llama(), IDS)
    model = tiny_llama()  # same seed: same weights
    adapter.apply(model, method_recipe("adapter", variant=variant).method)
    for layer in adapter.adapter_layers(model).values():
        assert torch.count_nonzero(layer.adapter_up.weight) == 0 and torch.count_nonzero(layer.adapter_up.bias) == 0
        assert torch.count_nonzero(layer.adapter_down.weight) > 0
    assert torch.equal(logits(model, IDS), expected)  # y + 0: bit-identical


@pytest.mark.parametrize("variant,expected", [
    ("houlsby", [f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")]),
    ("pfeiffer", [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]),
])
def test_houlsby_wraps_two_per_block_pfeiffer_one(variant, expected):
    model = tiny_llama()
    names = adapter.apply(model, method_recipe("adapter", variant=variant).method)
    assert names == expected and sorted(adapter.adapter_layers(model)) == sorted(expected)
    assert isinstance(model.model.layers[0].self_attn.o_proj, adapter.BottleneckAdapter) == (variant == "houlsby")


@pytest.mark.parametrize("variant,rf,count", [
    # hand computation, hidden d = 64, bottleneck m = 64 // rf; weights and biases both train:
    # per adapter d·m + m (down) + m·d + d (up)
    ("houlsby", 16, 4 * (64 * 4 + 4 + 4 * 64 + 64)),   # 2 blocks x 2 adapters = 2320
    ("pfeiffer", 16, 2 * (64 * 4 + 4 + 4 * 64 + 64)),  # 2 blocks x 1 adapter = 1160
    ("pfeiffer", 8, 2 * (64 * 8 + 8 + 8 * 64 + 64)),
])
def test_trainable_parameter_count(variant, rf, count):
    model = tiny_llama()
    adapter.apply(model, method_recipe("adapter", variant=variant, reduction_factor=rf).method)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter_down." in n or ".adapter_up." in n for n in trainable)
    assert sum(trainable.values()) == count


@pytest.mark.parametrize("non_linearity,act", [("relu", torch.relu), ("gelu", F.gelu), ("silu", F.silu), ("tanh", torch.tanh)])
def test_forward_by_hand(non_linearity, act):
    layer = adapter.BottleneckAdapter(nn.Linear(32, 64), reduction_factor=16, non_linearity=non_linearity)
    torch.nn.init.normal_(layer.adapter_up.weight)
    torch.nn.init.normal_(layer.adapter_up.bias)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        y = layer.base_layer(x)
        # hand computation: y + W_up act(W_down y + b_down) + b_up, bottleneck m = 64 // 16 = 4
        down, up = layer.adapter_down, layer.adapter_up
        expected = y + act(y @ down.weight.T + down.bias) @ up.weight.T + up.bias
        assert down.weight.shape == (4, 64) and up.weight.shape == (64, 4)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_layers_option_and_bad_values():
    model = tiny_llama()
    names = adapter.apply(model, method_recipe("adapter", layers=[1]).method)
    assert names == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(UserError, match=r"method.layers: 5 is out of range \(the model has blocks 0..1\)"):
        adapter.apply(tiny_llama(), method_recipe("adapter", layers=[5]).method)
    with pytest.raises(UserError, match="reduction_factor: 128 exceeds the hidden size 64"):
        adapter.apply(tiny_llama(), method_recipe("adapter", reduction_factor=128).method)
    with pytest.raises(UserError, match="method.non_linearity"):
        method_recipe("adapter", non_linearity="softmax")
    with pytest.raises(UserError, match="method.reduction_factor"):
        method_recipe("adapter", reduction_factor=0)


# ---------------------------------------------------------------------------------------------
# training


def test_gradient_step_changes_logits():
    model = tiny_llama()
    adapter.apply(model, method_recipe("adapter").method)
    before = logits(model, IDS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    model(IDS, labels=IDS).loss.backward()
    layer = model.model.layers[0].mlp.down_proj
    assert layer.adapter_up.weight.grad.abs().sum() > 0
    assert layer.adapter_down.weight.grad.abs().sum() == 0  # up is zero at init, as LoRA's B
    optimizer.step()
    assert (logits(model.eval(), IDS) - before).abs().max() > 1e-4


def test_tiny_training_run_and_reload(tmp_path, tiny_dir):
    from peftcli.rundir import read_events
    from peftcli.trainer import train

    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "adapter", "variant": "houlsby", "reduction_factor": 8, "non_linearity": "gelu"})

    result = train(recipe)

    losses = [e["loss"] for e in read_events(result.run_dir / "metrics.jsonl") if e["event"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert result.summary["trainable_params"] == 4 * (64 * 8 + 8 + 8 * 64 + 64)
    loaded = artifacts.load_adapted(result.run_dir)
    reloaded = loaded.model
    assert loaded.method == "adapter"
    assert torch.equal(logits(reloaded, IDS), logits(result.model, IDS))


# ---------------------------------------------------------------------------------------------
# files


def test_save_load_round_trip_and_file_layout(tiny_dir, tmp_path):
    model = trained(tiny_dir, tmp_path / "adapter", variant="pfeiffer", reduction_factor=8, non_linearity="silu")
    ours = logits(model, IDS)

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in ("peft_type", "task_type", "variant", "reduction_factor", "non_linearity", "layers_to_transform")} == \
        {"peft_type": "BOTTLENECK", "task_type": "CAUSAL_LM", "variant": "pfeiffer", "reduction_factor": 8,
         "non_linearity": "silu", "layers_to_transform": None}
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        f"base_model.model.model.layers.{i}.mlp.down_proj.adapter_{part}.{p}": shape
        for i in (0, 1)
        for part, p, shape in [("down", "weight", (8, 64)), ("down", "bias", (8,)), ("up", "weight", (64, 8)), ("up", "bias", (64,))]}

    loaded = artifacts.load_adapted(tmp_path / "adapter")
    reloaded = loaded.model
    assert loaded.method == "adapter"
    assert torch.equal(logits(reloaded, IDS), ours)

    # without our peftcli block the BOTTLENECK fields alone rebuild it
    hf_only = {k: v for k, v in cfg.items() if k != "peftcli"}
    expected = method_recipe("adapter", variant="pfeiffer", reduction_factor=8, non_linearity="silu").method
    assert adapter.config_from_adapter(hf_only) == expected
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(hf_only))
    loaded = artifacts.load_adapted(tmp_path / "adapter")
    reloaded = loaded.model
    assert loaded.method == "adapter"
    assert torch.equal(logits(reloaded, IDS), ours)


def test_weights_for_another_shape_are_refused(tiny_dir, tmp_path):
    trained(tiny_dir, tmp_path / "adapter", reduction_factor=8)
    model = tiny_llama()
    adapter.apply(model, method_recipe("adapter", reduction_factor=16).method)
    with pytest.raises(UserError, match=r"has shape \(8, 64\), the model needs \(4, 64\)"):
        adapter.load_state_dict(model, load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    model = tiny_llama()
    adapter.apply(model, method_recipe("adapter", variant="pfeiffer", reduction_factor=8).method)
    with pytest.raises(UserError, match="unexpected model.layers.0.self_attn.o_proj.adapter_down.bias"):
        adapter.load_state_dict(model, load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))


def test_merge_is_refused_with_the_reason(tiny_dir, tmp_path):
    trained(tiny_dir, tmp_path / "run" / "adapter")
    with pytest.raises(UserError, match=f"method adapter cannot be merged: {adapter.CANNOT_MERGE}"):
        merge.merge_adapter(tmp_path / "run", tmp_path / "merged")
    # the command line: exit 2, one line, no traceback
    p = subprocess.run([PEFT, "merge", str(tmp_path / "run"), "-o", str(tmp_path / "merged")], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 2
    assert adapter.CANNOT_MERGE in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------------------------------
# architectures: by structure, not class names


def test_blocks_found_by_structure_in_gpt_neox():
    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=320)).eval()
    expected = logits(model, IDS)
    names = adapter.apply(model, method_recipe("adapter", reduction_factor=4).method)
    assert names == [f"gpt_neox.layers.{i}.{p}" for i in range(3) for p in ("attention.dense", "mlp.dense_4h_to_h")]
    assert torch.equal(logits(model, IDS), expected)


class _Toy(nn.Module):
    """A bare stack of Linears: no blocks with attention or feed-forward parts."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("model", [_Toy()], ids=["sequential"])
def test_architecture_without_recognisable_blocks_is_a_user_error(model):
    with pytest.raises(UserError, match=f"cannot find the transformer blocks of this {type(model).__name__}") as err:
        adapter.apply(model, method_recipe("adapter").method)
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, adapter.BottleneckAdapter) for m in model.modules())  # nothing half-applied
