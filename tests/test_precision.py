"""Precision chosen per machine (peftcli.precision): ``model.dtype: auto`` and
``train.mixed_precision: auto`` on a CPU with bf16 units and on one without (emulated with
PEFTCLI_CPU_BF16, and with the CPU's answers replaced), on CUDA with and without bf16; set values
kept; the banner, summary.json, ``peft validate`` (and its memory estimate), ``peft eval`` and
loading an adapter use what was chosen."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import method_recipe, peft_in_process, perturb, saved_adapter, write_recipe
from rich.console import Console
from tiny import tiny_run_recipe

from peftcli import artifacts, memory, precision, prepare
from peftcli.errors import UserError
from peftcli.trainer import train

LORA_QV = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
AVX2_LINE = ("precision: base float32, no autocast "
             "(auto: this CPU has no bf16 units (AVX2 only), where bf16 is emulated and slow)")


def auto_recipe(tmp_path, tiny_dir, **train_keys):
    """A one-step tiny LoRA run with ``model.dtype`` and ``train.mixed_precision`` left to auto."""
    recipe = tiny_run_recipe(tmp_path, tiny_dir, LORA_QV, max_steps=1, **train_keys)
    recipe.model.dtype = "auto"
    if "mixed_precision" not in train_keys:
        recipe.train.mixed_precision = "auto"
    return recipe


def frozen_and_trained_dtypes(model) -> tuple[set, set]:
    return ({p.dtype for p in model.parameters() if not p.requires_grad},
            {p.dtype for p in model.parameters() if p.requires_grad})


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one mixed precision per process (a second Accelerator with another one
    raises); these tests train with bf16 and without in one process, so each starts and ends clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def cpu(monkeypatch):
    """Replace what the CPU says about itself: ``cpu(native, flags)``."""
    monkeypatch.delenv(precision.ENV, raising=False)

    def set_cpu(native: bool, flags: set[str]):
        monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: native)
        monkeypatch.setattr(precision, "cpu_info", lambda: ("Some CPU", frozenset(flags)))
    return set_cpu


# ---------------------------------------------------------------------------------------------
# the choice


def test_auto_on_a_cpu_with_bf16_units_is_bf16_autocast_over_a_float32_base(cpu):
    cpu(True, {"avx2", "avx512f", "avx512_bf16"})
    chosen = precision.choose("auto", "auto", "cpu")
    assert (chosen.dtype, chosen.autocast, chosen.warning) == ("float32", "bf16", None)
    assert chosen.describe() == "precision: base float32 (linear weights bfloat16), autocast bf16 (auto: this CPU has avx512_bf16)"
    assert chosen.linear_dtype == "bfloat16" and precision.choose("float32", "auto", "cpu").linear_dtype is None
    cpu(True, {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert precision.choose("auto", "auto", "cpu").reason == "auto: this CPU has avx512_bf16, amx_bf16"


def test_auto_on_an_avx2_only_cpu_is_float32_without_autocast(cpu):
    cpu(False, {"avx2", "fma"})
    chosen = precision.choose("auto", "auto", "cpu")
    assert (chosen.dtype, chosen.autocast, chosen.warning) == ("float32", "no", None)
    assert chosen.describe() == AVX2_LINE
    cpu(False, {"avx2", "avx512f"})
    assert "no bf16 units (AVX-512 without BF16)" in precision.choose("auto", "auto", "cpu").reason


@pytest.mark.parametrize("forced,dtype,autocast", [("0", "float32", "no"), ("1", "float32", "bf16")])
def test_PEFTCLI_CPU_BF16_forces_the_cpu_answer_either_way(cpu, monkeypatch, forced, dtype, autocast):
    for native in (True, False):  # whatever the CPU has
        cpu(native, {"avx2", "avx512_bf16"} if native else {"avx2"})
        monkeypatch.setenv(precision.ENV, forced)
        chosen = precision.choose("auto", "auto", "cpu")
        assert (chosen.dtype, chosen.autocast) == (dtype, autocast)
        assert chosen.reason.startswith(f"auto: PEFTCLI_CPU_BF16={forced} treats this CPU as one ")
        assert ("it has avx512_bf16" if native else "it has no bf16 units (AVX2 only)") in chosen.reason


def test_a_bad_PEFTCLI_CPU_BF16_is_one_line(monkeypatch):
    monkeypatch.setenv(precision.ENV, "yes")
    with pytest.raises(UserError, match=r"^PEFTCLI_CPU_BF16=yes: set it to 1 .* 0 .*, or unset it$"):
        precision.choose("auto", "auto", "cpu")


@pytest.mark.parametrize("bf16,dtype,autocast,says", [(True, "float32", "bf16", "supports bf16"),
                                                      (False, "float32", "fp16", "has no bf16")])
def test_auto_on_cuda(monkeypatch, bf16, dtype, autocast, says):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Some GPU")
    chosen = precision.choose("auto", "auto", "cuda")
    assert (chosen.dtype, chosen.autocast, chosen.reason) == (dtype, autocast, f"auto: Some GPU {says}")


@pytest.mark.parametrize("forced", ["0", "1"])
@pytest.mark.parametrize("dtype,mixed", [("float32", "no"), ("float32", "bf16"), ("bfloat16", "no"),
                                         ("float16", "no"), ("float32", "fp16")])
def test_explicit_settings_are_kept_on_either_cpu(monkeypatch, forced, dtype, mixed):
    monkeypatch.setenv(precision.ENV, forced)
    chosen = precision.choose(dtype, mixed, "cpu")
    assert (chosen.dtype, chosen.autocast, chosen.reason) == (dtype, mixed, "as set in the recipe")


def test_explicit_bf16_on_a_cpu_without_bf16_units_warns_once_in_one_line(cpu):
    cpu(False, {"avx2"})
    for dtype, mixed, key in [("bfloat16", "no", "model.dtype: bfloat16"), ("float32", "bf16", "train.mixed_precision: bf16")]:
        chosen = precision.choose(dtype, mixed, "cpu")
        assert (chosen.dtype, chosen.autocast) == (dtype, mixed)  # honoured, not refused
        assert chosen.warning.startswith(f"warning: {key}, but this CPU has no bf16 units (AVX2 only): bf16 is emulated")
        assert "10-17x slower" in chosen.warning and "\n" not in chosen.warning
        assert chosen.lines() == [chosen.describe(), chosen.warning]
    cpu(True, {"avx512_bf16"})
    assert precision.choose("bfloat16", "bf16", "cpu").warning is None  # native there
    assert precision.choose("bfloat16", "no", "cuda").warning is None  # a GPU is not emulating


def test_auto_dtype_is_float32_for_a_full_precision_base_and_a_4bit_base_follows_the_autocast(monkeypatch):
    monkeypatch.setenv(precision.ENV, "1")
    assert precision.choose("auto", "no", "cpu").dtype == "float32"  # no autocast: full precision throughout
    assert precision.choose("auto", "fp16", "cpu").dtype == "float32"
    monkeypatch.setenv(precision.ENV, "0")
    assert precision.choose("auto", "bf16", "cpu").dtype == "float32"  # the residual stream stays float32
    assert precision.choose("auto", "bf16", "cpu", quantization="nf4").dtype == "bfloat16"
    assert precision.choose("auto", "no", "cpu", quantization="nf4").dtype == "float32"
    monkeypatch.setenv(precision.ENV, "1")
    chosen = precision.choose("float32", "auto", "cpu")
    assert (chosen.dtype, chosen.autocast) == ("float32", "bf16") and chosen.reason.startswith("model.dtype as set;")


def test_qlora_auto_is_the_4bit_compute_dtype(monkeypatch):
    monkeypatch.setenv(precision.ENV, "1")
    chosen = precision.choose("auto", "auto", "cpu", quantization="nf4")
    assert chosen.dtype == "bfloat16" and chosen.describe().startswith("precision: base nf4 (compute bfloat16), autocast bf16 (")


def test_the_cpu_flags_are_read_from_proc_cpuinfo():
    name, flags = precision.cpu_info()
    with open("/proc/cpuinfo") as f:  # the reference: the file itself
        lines = f.read().splitlines()
    first = next(line for line in lines if line.startswith(("flags", "Features")))
    assert flags == frozenset(first.split(":", 1)[1].split())
    assert name == next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


# ---------------------------------------------------------------------------------------------
# where the choice is used


@pytest.mark.parametrize("forced,frozen,mixed", [("1", torch.float32, "bf16"), ("0", torch.float32, "no")])
def test_prepare_loads_the_base_in_the_chosen_dtype_and_keeps_trained_weights_float32(
        tmp_path, tiny_dir, monkeypatch, forced, frozen, mixed):
    monkeypatch.setenv(precision.ENV, forced)
    p = prepare.load(auto_recipe(tmp_path, tiny_dir))
    assert frozen_and_trained_dtypes(p.model) == ({frozen}, {torch.float32})
    assert p.mixed == p.precision.autocast == mixed


def test_an_explicit_dtype_is_loaded_as_set(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv(precision.ENV, "1")
    recipe = auto_recipe(tmp_path, tiny_dir)
    recipe.model.dtype = "float32"
    p = prepare.load(recipe)
    assert frozen_and_trained_dtypes(p.model) == ({torch.float32}, {torch.float32}) and p.mixed == "bf16"


@pytest.mark.parametrize("forced,dtype,mixed", [("1", "float32", "bf16"), ("0", "float32", "no")])
def test_the_train_banner_and_summary_say_what_was_chosen_and_why(tmp_path, tiny_dir, monkeypatch, cpu, forced, dtype, mixed):
    cpu(forced == "0", {"avx2", "avx512_bf16"} if forced == "0" else {"avx2"})  # the override says the opposite of the CPU
    monkeypatch.setenv(precision.ENV, forced)
    printed = io.StringIO()
    result = train(auto_recipe(tmp_path, tiny_dir), console=Console(file=printed, width=400))
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("precision: ")]
    reason = {"1": "auto: PEFTCLI_CPU_BF16=1 treats this CPU as one with bf16 units (it has no bf16 units (AVX2 only))",
              "0": "auto: PEFTCLI_CPU_BF16=0 treats this CPU as one without bf16 units (it has avx512_bf16)"}[forced]
    cast = "autocast bf16" if mixed == "bf16" else "no autocast"
    linear = "bfloat16" if mixed == "bf16" else None
    assert lines == [f"precision: base {dtype}{' (linear weights bfloat16)' * bool(linear)}, {cast} ({reason})"]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["mixed_precision"] == mixed
    assert summary["precision"] == {"dtype": dtype, "mixed_precision": mixed, "reason": reason, "warning": None,
                                    "linear_dtype": linear}
    assert "dtype: auto" in (result.run_dir / "recipe.yaml").read_text()  # the recipe keeps auto; the choice is the summary's


def test_validate_prints_the_choice_and_estimates_memory_in_the_chosen_dtype(tmp_path, tiny_dir, monkeypatch, capsys):
    from peftcli import cli

    seen = []
    real = memory.dry_step_peak
    monkeypatch.setattr(memory, "dry_step_peak", lambda model, batch, mixed, *a: seen.append(
        (frozen_and_trained_dtypes(model)[0], mixed)) or real(model, batch, mixed, *a))
    monkeypatch.setattr(cli, "out", Console(stderr=True, width=400))  # validate's report in the captured stream
    recipe = auto_recipe(tmp_path, tiny_dir)
    path = write_recipe(tmp_path / "r.yaml", recipe.model_dump(mode="json"))
    for forced, dtypes, mixed in (("1", {torch.float32, torch.bfloat16}, "bf16"), ("0", {torch.float32}, "no")):
        monkeypatch.setenv(precision.ENV, forced)
        code, err = peft_in_process(["validate", path], capsys)
        assert code == 0, err
        assert precision.choose("auto", "auto", "cpu").describe() in err
        assert seen[-1] == (dtypes, mixed)  # the dry step ran on the base as the run stores it


def test_explicit_bf16_on_an_emulating_cpu_warns_in_validate(tmp_path, tiny_dir, monkeypatch, capsys):
    from peftcli import cli

    monkeypatch.setattr(cli, "out", Console(stderr=True, width=400))
    monkeypatch.setenv(precision.ENV, "0")
    recipe = auto_recipe(tmp_path, tiny_dir, mixed_precision="no")
    recipe.model.dtype = "bfloat16"
    code, err = peft_in_process(["validate", write_recipe(tmp_path / "r.yaml", recipe.model_dump(mode="json"))], capsys)
    assert code == 0, err
    assert "precision: base bfloat16, no autocast (as set in the recipe)" in err
    assert "warning: model.dtype: bfloat16, but PEFTCLI_CPU_BF16=0 treats this CPU as one without bf16 units" in err


@pytest.mark.parametrize("forced,dtype", [("1", torch.float32), ("0", torch.float32)])  # full precision: float32 on either
def test_an_auto_adapter_loads_its_base_in_what_this_machine_chooses(tiny_dir, tmp_path, monkeypatch, forced, dtype):
    monkeypatch.setenv(precision.ENV, forced)
    saved_adapter(method_recipe("lora", tiny_dir, dtype="auto", r=4, alpha=8), tmp_path / "adapter",
                  lambda model: perturb(model, ["lora_B"]))
    loaded = artifacts.load_adapted(tmp_path / "adapter")
    assert frozen_and_trained_dtypes(loaded.model) == ({dtype}, {torch.float32})
    assert loaded.precision.dtype == str(dtype).removeprefix("torch.")


def test_a_recorded_float32_and_an_hf_peft_adapter_load_in_float32_on_a_bf16_cpu(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(precision.ENV, "1")
    saved_adapter(method_recipe("lora", tiny_dir, dtype="float32", r=4, alpha=8), tmp_path / "adapter")
    assert frozen_and_trained_dtypes(artifacts.load_adapted(tmp_path / "adapter").model)[0] == {torch.float32}
    config = tmp_path / "adapter" / artifacts.CONFIG_NAME
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "peftcli"}))
    assert frozen_and_trained_dtypes(artifacts.load_adapted(tmp_path / "adapter").model)[0] == {torch.float32}


def test_eval_says_and_uses_the_chosen_base_dtype(tiny_dir, tmp_path, monkeypatch):
    from peftcli import evaluate

    monkeypatch.setenv(precision.ENV, "1")
    train(auto_recipe(tmp_path, tiny_dir), console=Console(file=io.StringIO()))
    scored = []
    real = evaluate.score
    monkeypatch.setattr(evaluate, "score", lambda model, *a, **k: scored.append(
        model.get_input_embeddings().weight.dtype) or real(model, *a, **k))
    said = []
    result = evaluate.evaluate(str(tmp_path / "run"), data_path=str(tmp_path / "train.jsonl"), fmt="alpaca",
                               generate_answers=False, say=said.append)
    assert scored == [torch.float32, torch.float32]  # base, then adapted: a full-precision base stays float32
    assert said == [precision.choose().describe(autocast=False)] and said[0].startswith("precision: base float32 (auto: ")
    assert result["precision"]["dtype"] == "float32"


# ---------------------------------------------------------------------------------------------
# frozen Linear weights stored in bf16 under bf16 autocast


def test_bf16_autocast_stores_only_the_frozen_linears_in_bf16(tmp_path, tiny_dir, monkeypatch):
    from torch import nn

    monkeypatch.setenv(precision.ENV, "1")
    p = prepare.load(auto_recipe(tmp_path, tiny_dir))
    assert p.precision.linear_dtype == "bfloat16"
    prepare.store_linear_weights(p)
    head = p.model.get_output_embeddings()
    for name, module in p.model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            stored = torch.bfloat16 if isinstance(module, nn.Linear) and module is not head and not param.requires_grad else torch.float32
            assert param.dtype == stored, f"{name}.{pname}"
    assert any(param.dtype == torch.bfloat16 for param in p.model.parameters())


def test_stored_linears_give_the_loss_and_gradients_of_autocast_bit_for_bit(tmp_path, tiny_dir, monkeypatch):
    """The reference: the same model with float32 weights, cast by autocast at every matmul."""
    monkeypatch.setenv(precision.ENV, "1")
    runs = []
    for store in (False, True):
        torch.manual_seed(0)
        (tmp_path / str(store)).mkdir()
        p = prepare.load(auto_recipe(tmp_path / str(store), tiny_dir))
        for module in p.model.modules():  # a nonzero B, so every LoRA gradient is exercised
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B.weight, std=0.02)
        if store:
            prepare.store_linear_weights(p)
        batch = prepare.data.collate(p.datasets.train[:2], p.tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = p.model(**batch).loss
        loss.backward()
        runs.append((loss.detach(), [q.grad.clone() for q in p.model.parameters() if q.requires_grad]))
    (loss_f32, grads_f32), (loss_bf16, grads_bf16) = runs
    assert torch.equal(loss_f32, loss_bf16)
    assert all(torch.equal(a, b) for a, b in zip(grads_f32, grads_bf16)) and grads_f32


def test_dora_keeps_its_base_weights_float32(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv(precision.ENV, "1")
    recipe = auto_recipe(tmp_path, tiny_dir)
    recipe.method.dora = True
    p = prepare.load(recipe)
    assert p.precision.linear_dtype is None and "linear weights" not in p.precision.describe()
    prepare.store_linear_weights(p)
    assert all(param.dtype == torch.float32 for param in p.model.parameters())
