"""C12: the trained loss is the model's own loss — the fast path proves itself (peftcli.guard)."""

import json

import pytest
import torch
import torch.nn.functional as F
from tiny import SORT_ROWS, tiny_llama, tiny_run_recipe, tiny_tokenizer
from transformers import Gemma2Config, Gemma2ForCausalLM

from peftcli import data, guard, loss, methods, models, prepare, trainer
from peftcli.errors import UserError
from peftcli.methods import lora_kernel


def own_loss(model, examples, pad_id):
    """Hand reference: the model's own forward on right-padded rows, its own logits, mean CE."""
    batch = data.collate(examples, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return float(F.cross_entropy(logits[keep].float(), targets[keep]))


def adapted(model, tok, tmp_path, **method):
    recipe = tiny_run_recipe(tmp_path, "unused", {"name": "lora", "target_modules": "all-linear", "dropout": 0.0, **method})
    module = methods.get("lora")
    module.apply(model, recipe.method)
    torch.manual_seed(1)
    for layer in module.lora_layers(model).values():  # a non-zero B, so every gradient is in play
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    examples, _ = data.tokenize_rows(SORT_ROWS, "alpaca", tok, 128, False, "rows")
    return recipe, module, examples


def transform_logits(model, fn):
    """A logit transform after the head that no list names: a forward hook on the causal LM."""
    def hook(module, args, output):
        output.logits = fn(output.logits)
        return output
    model.register_forward_hook(hook)
    return model


def test_C12_fast_path_agrees_with_the_model_on_llama(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    recipe, module, examples = adapted(model, tok, tmp_path)
    path = prepare.choose_loss_path(model, recipe, module, examples, tok.pad_token_id, "no")
    assert path.name == "fast" and path.padding_free
    assert path.loss_diff <= 1e-6 and path.grad_diff <= 1e-5
    assert model.training is False  # mode left as it was


@pytest.mark.parametrize("kind", ["scale", "tanh", "shift-per-token"])
def test_C12_guard_catches_a_logit_transform_nobody_listed(tmp_path, kind):
    tok = tiny_tokenizer()
    fn = {"scale": lambda z: 3.0 * z,
          "tanh": lambda z: 2.0 * torch.tanh(z / 2.0),
          "shift-per-token": lambda z: z + torch.linspace(0, 4, z.shape[-1])}[kind]
    model = transform_logits(tiny_llama(tok), fn)
    recipe, module, examples = adapted(model, tok, tmp_path)
    path = prepare.choose_loss_path(model, recipe, module, examples, tok.pad_token_id, "no")
    assert path.name == "reference"
    assert [t["agrees"] for t in path.tried] == [False, False]
    # the chosen path's loss is the model's own (hand reference above)
    with torch.no_grad():
        s, n = path.loss_sum(model, data.collate(examples[:2], tok.pad_token_id))
    assert float(s) / n == pytest.approx(own_loss(model, examples[:2], tok.pad_token_id), rel=1e-6)


def test_C12_gemma2_final_softcap_is_caught(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=0.5,
                          pad_token_id=tok.pad_token_id)
    model = Gemma2ForCausalLM(config).eval()
    recipe, module, examples = adapted(model, tok, tmp_path)
    path = prepare.choose_loss_path(model, recipe, module, examples, tok.pad_token_id, "no")
    assert path.name == "reference"
    assert path.tried[0]["grad_diff"] > 1e-2


def test_C12_a_wrong_hand_written_backward_is_not_trusted(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    recipe, module, examples = adapted(model, tok, tmp_path)
    right = lora_kernel.LoRABranch.backward

    def doubled(ctx, grad_out):  # a kernel bug: B's gradient twice what it should be
        grads = list(right(ctx, grad_out))
        grads[2] = grads[2] * 2
        return tuple(grads)

    monkeypatch.setattr(lora_kernel.LoRABranch, "backward", staticmethod(doubled))
    path = prepare.choose_loss_path(model, recipe, module, examples, tok.pad_token_id, "no")
    assert path.name == "reference" and all(not t["agrees"] and t["loss_diff"] < 1e-6 for t in path.tried)
    # the reference path trains through the plain formula: its gradients are autograd's
    layer = next(iter(module.lora_layers(model).values()))
    assert layer.fused_backward is False
    model.train()
    s, n = path.loss_sum(model, data.collate(examples[:2], tok.pad_token_id))
    (s / n).backward()
    got = layer.lora_B.weight.grad.clone()
    layer.lora_B.weight.grad = None
    monkeypatch.setattr(lora_kernel.LoRABranch, "backward", staticmethod(right))
    guard.set_fused_backward(model, True)
    s, n = loss.supervised_loss_sum(model, data.collate(examples[:2], tok.pad_token_id))
    (s / n).backward()
    assert torch.allclose(got, layer.lora_B.weight.grad, atol=1e-7)


def test_C12_training_on_a_transformed_model_matches_its_own_loss(tmp_path, tiny_dir, monkeypatch):
    tok = tiny_tokenizer()
    load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: transform_logits(load(*a, **k), lambda z: 2.0 * torch.tanh(z)))
    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora", "target_modules": "all-linear", "dropout": 0.0},
                             eval_rows=True, max_steps=3)
    result = trainer.train(recipe)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["loss_path"]["name"] == "reference" and summary["padding_free"] is False
    events = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(e for e in events if e.get("event") == "train" and e["step"] == 1)
    # step 1 runs on the base (B = 0): its loss is the transformed base model's own loss on that micro-batch
    base = transform_logits(load(str(tiny_dir)), lambda z: 2.0 * torch.tanh(z))
    ds = result.datasets
    batch = [ds.train[i] for i in data.batches(ds.train, 2, recipe.train.seed, 0)[0]]
    assert first["loss"] == pytest.approx(own_loss(base, batch, tok.pad_token_id), rel=1e-5)
    # the final eval loss is the trained model's own loss on the eval rows
    with torch.no_grad():
        assert summary["eval_loss"] == pytest.approx(own_loss(result.model.eval(), ds.eval, tok.pad_token_id), rel=1e-5)


def test_C12_a_method_the_forward_never_reaches_is_refused(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    recipe, module, examples = adapted(model, tok, tmp_path)
    model.forward_bypass = torch.nn.Linear(2, 2)  # trainable, but not on the forward's way
    for p in model.parameters():
        p.requires_grad_(False)
    model.forward_bypass.weight.requires_grad_(True)
    with pytest.raises(UserError, match="gradient through LlamaForCausalLM's own forward.*not on the forward's way"):
        prepare.choose_loss_path(model, recipe, module, examples, tok.pad_token_id, "no")


def test_C12_the_path_line_names_only_kernels_the_method_has(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    recipe = tiny_run_recipe(tmp_path, "unused", {"name": "ia3"})
    module = methods.get("ia3")
    module.apply(model, recipe.method)
    examples, _ = data.tokenize_rows(SORT_ROWS, "alpaca", tok, 128, False, "rows")
    path = prepare.choose_loss_path(model, recipe, module, examples, tok.pad_token_id, "no")
    assert path.name == "fast" and not path.fused and "LoRA" not in path.describe()
    lora_model = tiny_llama(tok)
    recipe, module, examples = adapted(lora_model, tok, tmp_path)
    assert "hand-written LoRA backward" in prepare.choose_loss_path(lora_model, recipe, module, examples, tok.pad_token_id, "no").describe()


def test_C12_scoring_only_names_no_backward(tmp_path):
    """peft eval checks the loss without gradients: its path line names no backward kernel."""
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    recipe, module, examples = adapted(model, tok, tmp_path)
    path = guard.choose_loss_path(model, examples, tok.pad_token_id, padding_free=False, gradients=False)
    assert path.name == "fast-padded" and not path.fused and "backward" not in path.describe()
    assert path.grad_diff is None
