"""The method contract, once for every registered method (``peftcli.methods.METHODS``): the
surface itself (``peftcli.methods.Method``, checked by ``methods.check``) and what every method
must do — apply freezes the base and trains only its own parts, the weights and the config
round-trip through their file forms, and merging is exact where the method says it merges and
refused with its reason where not. Tiny random Llama, float32, each method's default config."""

from __future__ import annotations

import json
import re
import types

import pytest
import torch
from helpers import logits, nudge
from transformers import AutoTokenizer

from peftcli import methods, models
from peftcli.errors import UserError

NAMES = list(methods.METHODS)
IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])
SURFACE = ["Config", "PEFT_TYPE", "PAPER", "SUMMARY", "PADDING_FREE", "CANNOT_MERGE", "apply", "state_dict",
           "load_state_dict", "adapter_config", "config_from_adapter", "merge", "file_fields", "base_quantization",
           "reads_adapter", "lr_groups"]


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def base(tiny_dir, name: str):
    """The tiny base loaded as ``name`` trains on it (its ``base_quantization``: NF4 for qlora), eval mode."""
    return models.load_model(str(tiny_dir), methods.get(name).base_quantization("none"))


def adapted(tiny_dir, tok, name: str, seed: int = 0):
    """(model, cfg, targets): ``name`` applied with its default config, every trainable
    parameter then moved off its init (as if trained), so the method changes the logits."""
    module = methods.get(name)
    model, cfg = base(tiny_dir, name), module.Config()
    torch.manual_seed(seed)
    targets = module.apply(model, cfg, tokenizer=tok)
    nudge(model, seed=seed + 1, scale=0.1)
    return model.eval(), cfg, targets


# ---------------------------------------------------------------------------------------------
# the surface


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_method_provides_the_surface(name):
    module = methods.get(name)
    methods.check(name, module)  # what the registry ran at import
    assert set(SURFACE) == set(methods.Method.__annotations__) | {
        m for m in vars(methods.Method) if callable(vars(methods.Method)[m]) and not m.startswith("_")}
    assert module.Config().name == name and methods.METHOD_CONFIGS[name] is module.Config
    assert module.CANNOT_MERGE is None or (module.CANNOT_MERGE.strip() and "\n" not in module.CANNOT_MERGE)
    assert module.base_quantization("nf4") == "nf4"  # no method refuses a 4-bit base
    assert module.base_quantization("none") in ("none", "nf4")


@pytest.mark.parametrize("name", NAMES)
def test_a_module_missing_or_mistyping_a_member_is_refused(name):
    real = methods.get(name)

    def copy(**changes):
        module = types.ModuleType(f"toy_{name}")
        for member in SURFACE:
            setattr(module, member, getattr(real, member))
        for member, value in changes.items():
            if value is None and member != "CANNOT_MERGE":
                delattr(module, member)
            else:
                setattr(module, member, value)
        return module

    methods.check(name, copy())  # the copy itself passes
    for member in SURFACE:
        if member == "CANNOT_MERGE":
            continue
        with pytest.raises(TypeError, match=rf"toy_{name} has no {member}\b"):
            methods.check(name, copy(**{member: None}))
    with pytest.raises(TypeError, match=rf"toy_{name} has no CANNOT_MERGE"):
        module = copy()
        del module.CANNOT_MERGE
        methods.check(name, module)
    wrong = {"CANNOT_MERGE": False, "PEFT_TYPE": 3, "PADDING_FREE": "yes", "Config": dict, "merge": "no"}
    for member, value in wrong.items():
        with pytest.raises(TypeError, match=rf"toy_{name}: {member}\b"):
            methods.check(name, copy(**{member: value}))
    with pytest.raises(TypeError, match=rf"toy_{name}: apply\(\) takes no 'tokenizer'"):
        methods.check(name, copy(apply=lambda model, cfg: []))
    with pytest.raises(TypeError, match=rf"toy_{name}: Config.name must default to 'other'"):
        methods.check("other", copy())
    card = methods.CARDS[name]  # the schema and description are the card's, the very objects
    assert all(getattr(real, member) is getattr(card, member) for member in methods.CARD_MEMBERS)
    with pytest.raises(TypeError, match=rf"toy_{name}: SUMMARY is not its card's"):
        methods.check(name, copy(SUMMARY=real.SUMMARY + " (changed)"))


@pytest.mark.parametrize("name", NAMES)
def test_lr_groups_hold_every_trainable_parameter_once(tiny_dir, tok, name):
    model, cfg, _ = adapted(tiny_dir, tok, name)
    groups = methods.get(name).lr_groups(model, cfg)
    assert groups[0][0] == 1.0  # the first group trains at train.lr (the rate the log shows)
    grouped = [id(p) for _, group in groups for p in group]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# apply


@pytest.mark.parametrize("name", NAMES)
def test_apply_freezes_the_base_and_returns_what_it_wrapped(tiny_dir, tok, name):
    model = base(tiny_dir, name)
    before = list(model.parameters())
    training = {n: m.training for n, m in model.named_modules()}
    targets = methods.get(name).apply(model, methods.get(name).Config(), tokenizer=tok)
    assert targets and all(isinstance(t, str) for t in targets)
    for t in targets:
        model.get_submodule(t)  # each is a module path of the adapted model
    kept = {id(p) for p in model.parameters()}
    assert all(not p.requires_grad for p in before if id(p) in kept)
    assert any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules()) and not any(training.values())  # eval mode kept


@pytest.mark.parametrize("name", NAMES)
def test_only_the_methods_own_parts_train(tiny_dir, tok, name):
    model = base(tiny_dir, name)
    base_ids = {id(p) for p in model.parameters()}
    methods.get(name).apply(model, methods.get(name).Config(), tokenizer=tok)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(id(p) in base_ids for _, p in trainable)
    assert "other" not in methods.trainable_by_kind(model)  # no embedding, norm or head trains
    saved = methods.get(name).state_dict(model)
    assert saved and all(v.dtype == torch.float32 for v in saved.values())


# ---------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips_exactly_into_a_fresh_model(tiny_dir, tok, name):
    module = methods.get(name)
    model, _, _ = adapted(tiny_dir, tok, name)
    sd = module.state_dict(model)
    fresh, _, _ = adapted(tiny_dir, tok, name, seed=5)  # other trainable values
    assert not torch.equal(logits(fresh, IDS), logits(model, IDS))
    module.load_state_dict(fresh, sd)
    again = module.state_dict(fresh)
    assert sorted(again) == sorted(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


@pytest.mark.parametrize("name", NAMES)
def test_weights_that_do_not_fit_are_one_line_user_errors(tiny_dir, tok, name):
    module = methods.get(name)
    model, _, _ = adapted(tiny_dir, tok, name)
    sd = module.state_dict(model)
    with pytest.raises(UserError, match=r"^adapter weights do not fit .*: unexpected \S*bogus$"):
        module.load_state_dict(model, {**sd, "bogus": torch.zeros(1)})
    first = sorted(sd)[0]
    with pytest.raises(UserError, match=r"^adapter weights do not fit .*: missing "):
        module.load_state_dict(model, {k: v for k, v in sd.items() if k != first})
    with pytest.raises(UserError, match=r"^adapter weight \S+ has shape "):
        module.load_state_dict(model, {**sd, first: torch.zeros(*sd[first].shape[:-1], sd[first].shape[-1] + 1)})


@pytest.mark.parametrize("name", NAMES)
def test_adapter_config_round_trips_the_config_and_is_read_by_this_method_alone(tiny_dir, tok, name):
    module = methods.get(name)
    model, cfg, _ = adapted(tiny_dir, tok, name)  # apply resolved the defaults into cfg
    d = module.adapter_config(cfg)
    assert d["peft_type"] == module.PEFT_TYPE
    assert module.config_from_adapter(json.loads(json.dumps(d))) == cfg
    fields = module.file_fields(model)
    assert isinstance(fields, dict) and json.loads(json.dumps(fields)) == fields
    # with the base recorded as it trained on, exactly this method claims the file
    recorded = {**d, "peftcli": {"model": {"quantization": module.base_quantization("none")}}}
    assert [n for n, m in methods.METHODS.items() if m.reads_adapter(recorded)] == [name]


# ---------------------------------------------------------------------------------------------
# merge


@pytest.mark.parametrize("name", NAMES)
def test_merge_is_exact_where_the_method_merges_and_refused_with_its_reason_where_not(tiny_dir, tok, name):
    module = methods.get(name)
    model, _, _ = adapted(tiny_dir, tok, name)
    adapted_logits = logits(model, IDS)
    assert not torch.allclose(adapted_logits, logits(base(tiny_dir, name), IDS), atol=1e-3)  # the method changes them
    if module.CANNOT_MERGE is None:
        assert module.merge(model) is model
        assert module.state_dict(model) == {}  # nothing of the method is left
        torch.testing.assert_close(logits(model, IDS), adapted_logits, atol=1e-5, rtol=0)
    else:
        with pytest.raises(UserError, match=f"^method {name} cannot be merged: {re.escape(module.CANNOT_MERGE)}$"):
            module.merge(model)
        assert torch.equal(logits(model, IDS), adapted_logits)  # refused before touching anything
