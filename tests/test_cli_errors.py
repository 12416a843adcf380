"""Issue 5's bad-input list at the command line: exit 2, one line, no traceback."""

import json

import pytest
from helpers import method_recipe, perturb, saved_adapter, write_jsonl
from tiny import SORT_ROWS, save_tiny, tiny_run_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.errors import UserError
from peftcli.rundir import RunDir
from peftcli.trainer import train


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def foreign_adapter(tiny_dir, tmp_path_factory):
    """An adapter trained on tiny_dir whose config names another base with the same shapes."""
    tmp = tmp_path_factory.mktemp("foreign")
    other = save_tiny(tmp / "other", seed=1)
    recipe = method_recipe("lora", tiny_dir, r=4, alpha=8, target_modules=["q_proj"])
    saved_adapter(recipe, tmp / "adapter", lambda model: perturb(model, ["lora_B"]))
    file = tmp / "adapter" / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg["base_model_name_or_path"] = cfg["peftcli"]["model"]["name_or_path"] = str(other)
    file.write_text(json.dumps(cfg))
    write_jsonl(tmp / "eval.jsonl", SORT_ROWS)
    return tmp


@pytest.mark.parametrize("command", ["eval", "generate", "merge"])
def test_adapter_on_a_different_base_exits_2(foreign_adapter, command):
    adapter = str(foreign_adapter / "adapter")
    args = {"eval": ["eval", adapter, "--data", str(foreign_adapter / "eval.jsonl"), "--format", "alpaca"],
            "generate": ["generate", adapter, "Sort 3, 1"],
            "merge": ["merge", adapter, "-o", str(foreign_adapter / f"merged-{command}")]}[command]
    _one_line_error(CliRunner().invoke(app, args), "was trained on a different base model", "fingerprint")


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_dir):
    recipe = tiny_run_recipe(tmp_path, tiny_dir, {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
                             max_steps=20, lr=1e30, max_grad_norm=None, save_every=1, warmup_steps=0)
    with pytest.raises(UserError, match=r"train: loss is (nan|inf) at step (\d+)") as err:
        train(recipe)
    step = int(str(err.value).split("at step ")[1].split(";")[0])
    assert step >= 2  # step 1 is finite (it starts from the base), so a checkpoint was written before
    assert RunDir(tmp_path / "run").latest_checkpoint().name == f"step-{step - 1}"
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000  # the curve up to the divergence


def test_generate_with_an_hf_saved_adapter_sends_the_prompt_as_is(tiny_dir, tmp_path):
    # an adapter dir HF peft wrote has no recipe, so no train format: the prompt goes as typed
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.eval().generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    for extra in ([], ["--no-cache"]):
        result = CliRunner().invoke(app, ["generate", str(tmp_path / "hf"), "the quick brown fox", "--max-new-tokens", "4", *extra])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == expected.strip()
    _one_line_error(CliRunner().invoke(app, ["generate", str(tmp_path / "hf"), "  "]), "the prompt is empty")


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature: must be 0 (greedy) or more, got -1.0"),
    (["--temperature", "nan"], "--temperature: must be 0 (greedy) or more, got nan"),
    (["--temperature", "1", "--top-p", "0"], "--top-p: must be in (0, 1], got 0.0"),
    (["--temperature", "1", "--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5"),
    (["--top-p", "0.9"], "--top-p: only with sampling; give --temperature above 0 (0 is greedy)"),
])
def test_bad_sampling_flags_exit_2_before_any_model_loads(command, flags, message, tmp_path):
    # the target does not exist: the flags are checked first, so their error is the one reported
    args = [command, str(tmp_path / "no-run"), *(["Sort 3, 1"] if command == "generate" else []), *flags]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.stderr == f"error: {message}\n"
