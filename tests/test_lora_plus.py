"""LoRA+ (``method.lr_ratio``; Hayou et al. 2024, §3-4): B's learning rate is lr_ratio × A's.

Checked against HF peft's ``create_loraplus_optimizer`` (which parameter gets which rate) and
against AdamW by hand (Loshchilov & Hutter 2019, Algorithm 2) through the trainer's own steps:
the first step from B = 0 and the first step after a resume."""

from __future__ import annotations

import pytest
import torch
from helpers import peft_in_process, write_recipe
from tiny import tiny_llama, tiny_run_recipe

from peftcli import trainer
from peftcli.errors import UserError
from peftcli.methods import lora
from peftcli.recipe import validate
from peftcli.rundir import RunDir

RATIO, LR, WD = 16.0, 1e-2, 0.1
B1, B2, EPS = 0.9, 0.999, 1e-8  # torch's AdamW defaults, as make_optimizer uses


def _our_rates(model, cfg) -> dict[str, float]:
    """parameter name -> learning rate in our optimizer (train.lr = LR)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: LR * scale for scale, group in lora.lr_groups(model, cfg) for p in group}


@pytest.mark.parametrize("dora", [False, True])
def test_rates_per_parameter_equal_hf_peft_loraplus(tok, dora):
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    cfg = lora.Config(r=4, alpha=8, target_modules="all-linear", dora=dora, lr_ratio=RATIO)
    ours = tiny_llama(tok)
    lora.apply(ours, cfg)
    hf = get_peft_model(tiny_llama(tok), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora))
    opt = create_loraplus_optimizer(hf, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    hf_names = {id(p): n for n, p in hf.named_parameters()}
    # HF's names: base_model.model.<path>.lora_A.default.weight, <path>.lora_magnitude_vector.default.weight
    theirs = {hf_names[id(p)].removeprefix("base_model.model.").replace(".default", "")
              .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): g["lr"]
              for g in opt.param_groups for p in g["params"]}
    mine = _our_rates(ours, cfg)
    assert mine == theirs  # every trainable parameter, the same rate
    assert {v for k, v in mine.items() if "lora_B" in k} == {LR * RATIO}
    assert {v for k, v in mine.items() if "lora_A" in k} == {LR}
    assert any("magnitude" in k for k in mine) == dora


def test_without_lr_ratio_one_group(tok):
    cfg = lora.Config(r=4, target_modules="all-linear")
    model = tiny_llama(tok)
    lora.apply(model, cfg)
    groups = lora.lr_groups(model, cfg)
    assert [s for s, _ in groups] == [1.0]
    assert len(groups[0][1]) == sum(p.requires_grad for p in model.parameters())


def test_lr_ratio_is_a_key_of_the_lora_methods_only(tmp_path, capsys):
    for name in ("lora", "qlora"):
        assert validate({"method": {"name": name, "lr_ratio": 16}, "data": {"train": {"path": "x.jsonl"}}}).method.lr_ratio == 16
    with pytest.raises(UserError, match=r"method.lr_ratio: Input should be greater than 0"):
        validate({"method": {"name": "lora", "lr_ratio": 0}, "data": {"train": {"path": "x.jsonl"}}})
    path = write_recipe(tmp_path / "r.yaml", {"method": {"name": "ia3", "lr_ratio": 16}, "data": {"train": {"path": "x.jsonl"}}})
    code, out = peft_in_process(["validate", str(path)], capsys)
    assert code == 2 and "method.lr_ratio: unknown key" in out, out
    with pytest.raises(UserError, match=r"did you mean method.lr_ratio\? loraplus_lr_ratio is another tool's name"):
        validate({"method": {"name": "lora", "loraplus_lr_ratio": 16}, "data": {"train": {"path": "x.jsonl"}}})
    with pytest.raises(UserError, match=r"did you mean train.neftune_alpha\?"):
        validate({"method": {"name": "lora"}, "train": {"neftune_noise_alpha": 5}, "data": {"train": {"path": "x.jsonl"}}})


# ---------------------------------------------------------------------------------------------
# the trainer's steps against AdamW by hand


def _recipe(tmp_path, tiny_dir, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "lr_ratio": RATIO}
    return tiny_run_recipe(tmp_path, tiny_dir, method, lr=LR, weight_decay=WD, max_grad_norm=None, scheduler="constant",
                           **train)


class Steps:
    """Wraps ``trainer.make_optimizer`` so each optimizer step records, before it runs, every
    parameter's value, gradient and group learning rate (by parameter id)."""

    def __init__(self, monkeypatch):
        self.seen: list[dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = []
        real = trainer.make_optimizer

        def make(groups, recipe):
            optimizer = real(groups, recipe)
            optimizer.register_step_pre_hook(self._record)
            return optimizer

        monkeypatch.setattr(trainer, "make_optimizer", make)

    def _record(self, optimizer, args, kwargs):
        self.seen.append({id(p): (p.detach().clone(), p.grad.detach().clone(), g["lr"])
                          for g in optimizer.param_groups for p in g["params"]})

    def by_name(self, model, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        return {n: self.seen[step][id(p)] for n, p in model.named_parameters() if p.requires_grad}


def _rate(name: str) -> float:
    return LR * RATIO if "lora_B" in name else LR


def test_first_step_is_adamw_by_hand_with_two_rates(tmp_path, tiny_dir, monkeypatch):
    steps = Steps(monkeypatch)
    result = trainer.train(_recipe(tmp_path, tiny_dir, max_steps=1))
    seen = steps.by_name(result.model, 0)
    for name, p in result.model.named_parameters():
        if not p.requires_grad:
            continue
        p0, g, lr = (t.double() if isinstance(t, torch.Tensor) else t for t in seen[name])
        assert lr == _rate(name)
        # first AdamW step: m̂ = g, v̂ = g², so the update is lr·g/(|g| + eps), after the decoupled decay
        want = p0 * (1 - lr * WD) - lr * g / (g.abs() + EPS)
        assert torch.allclose(p.detach().double(), want, atol=1e-7, rtol=1e-6), name
        if "lora_B" in name:  # from B = 0 each B moves by the full B rate
            assert float(p.detach().abs().max()) == pytest.approx(LR * RATIO, rel=1e-3)
        else:  # A's gradient is zero at B = 0: it only decays, at A's rate
            assert not g.any() and torch.allclose(p.detach().double(), p0 * (1 - LR * WD))


def test_the_rates_and_moments_carry_over_a_resume(tmp_path, tiny_dir, monkeypatch):
    full = trainer.train(_recipe(tmp_path / "full", tiny_dir, max_steps=2))
    trainer.train(_recipe(tmp_path / "part", tiny_dir, max_steps=1, save_every=1))
    state = RunDir.read_checkpoint(RunDir(tmp_path / "part" / "run").checkpoint(1)).optimizer
    steps = Steps(monkeypatch)
    result = trainer.train(_recipe(tmp_path / "part", tiny_dir, max_steps=2, save_every=1), resume=True)
    assert [g["lr"] for g in state["param_groups"]] == [LR, LR * RATIO]
    model = result.model
    ids = {id(p): n for n, p in model.named_parameters()}
    grouped = [ids[id(p)] for _, group in lora.lr_groups(model, lora.Config(lr_ratio=RATIO)) for p in group]  # AdamW's ids
    moments = {grouped[int(i)]: s for i, s in state["state"].items()}
    seen = steps.by_name(model, 0)  # the resumed run's one step (step 2)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        p0, g, lr = (t.double() if isinstance(t, torch.Tensor) else t for t in seen[name])
        assert lr == _rate(name)
        m = B1 * moments[name]["exp_avg"].double() + (1 - B1) * g  # the second AdamW step from the checkpoint's moments
        v = B2 * moments[name]["exp_avg_sq"].double() + (1 - B2) * g * g
        want = p0 * (1 - lr * WD) - lr * (m / (1 - B1**2)) / ((v / (1 - B2**2)).sqrt() + EPS)
        assert torch.allclose(p.detach().double(), want, atol=1e-7, rtol=1e-6), name
    assert any(seen[n][1].any() for n in seen if "lora_A" in n)  # A learns at step 2 (B is no longer 0)
    for name, p in full.model.named_parameters():  # and the resumed run ends where the uninterrupted one did
        if p.requires_grad:
            assert torch.equal(p.detach(), dict(model.named_parameters())[name].detach()), name
