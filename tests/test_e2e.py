"""End to end on the embedded SmolLM2-135M-Instruct, through the `peft` command (slow: real model)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

PEFT = str(Path(sys.executable).with_name("peft"))
ROOT = Path(__file__).resolve().parent.parent


def peft(*args):
    p = subprocess.run([PEFT, *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, f"peft {' '.join(args)} failed:\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module", params=["lora-llama", "qlora-llama"])
def smoke_run(request, tmp_path_factory):
    """`peft train RECIPE --smoke` on the bundled recipe (4 steps on 16 rows)."""
    run = tmp_path_factory.mktemp(request.param) / "run"
    p = peft("train", f"peftcli/recipes/{request.param}.yaml", "--smoke", "--output-dir", str(run))
    return request.param, run, p


def test_smoke_trains_and_round_trips(smoke_run):
    name, run, p = smoke_run
    assert "smoke ok   adapter saved and reloaded" in p.stderr, p.stderr
    assert "FAIL" not in p.stderr
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    # the file names every wrapped Linear (30 layers x 7); the recipe's own form is in the peftcli block
    assert cfg["peft_type"] == "LORA" and len(cfg["target_modules"]) == 210 and "model.layers.29.mlp.down_proj" in cfg["target_modules"]
    assert cfg["peftcli"]["method"]["target_modules"] == "all-linear"
    assert cfg["peftcli"]["model"]["quantization"] == ("nf4" if name == "qlora-llama" else "none")
    # the alias resolves to the converted transformers dir, loadable by from_pretrained
    assert (Path(cfg["base_model_name_or_path"]) / "config.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["trainable_params"] == 4_884_480  # 30 layers x 7 Linear, r=16
    assert (run / "loss.png").stat().st_size > 1000


def test_eval_json_base_vs_adapted(smoke_run):
    _, run, _ = smoke_run
    result = json.loads(peft("eval", str(run), "--max-samples", "5", "--json").stdout)
    assert result["rows"] == 5
    for side in ("base", "adapted"):
        m = result[side]
        assert m["loss"] > 0 and m["perplexity"] == pytest.approx(2.718281828 ** m["loss"], rel=1e-6)
        assert 0.0 <= m["exact_match"] <= 1.0 and m["n_references"] == 5
    assert result["adapted"]["loss"] != result["base"]["loss"]
    alone = json.loads(peft("eval", str(run), "--max-samples", "5", "--json", "--no-base", "--no-exact-match").stdout)
    assert alone["base"] is None and alone["adapted"]["loss"] == result["adapted"]["loss"]


def test_merge_matches_adapted_model(smoke_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftcli import artifacts

    name, run, _ = smoke_run
    out = tmp_path / "merged"
    peft("merge", str(run), "-o", str(out))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loaded = artifacts.load_adapted(run)
    adapted, tok = loaded.model, loaded.tokenizer
    ids = tok(["Sort these numbers in ascending order: 9, 2, 5"], return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = adapted(ids).logits, merged(ids).logits
    # fp32 base: one rounding of W + sBA; NF4 base: dequant(W_nf4) + sBA vs the 4-bit kernel
    assert (a - b).abs().max() < (1e-4 if name == "lora-llama" else 1e-3)
    # SmolLM2 ties its head to the embedding; LoRA (all-linear) does not touch the head, so it stays tied
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


def test_generate(smoke_run):
    # the CLI prints the greedy answer to the prompt in the run's train format (alpaca); reference:
    # the same adapter loaded in-process, the alpaca template rendered by hand, transformers' generate
    from peftcli import artifacts

    _, run, _ = smoke_run
    question = "Which number is the largest? 3, 9, 4"
    p = peft("generate", str(run), question, "--max-new-tokens", "8")
    loaded = artifacts.load_adapted(run)
    model, tok = loaded.model, loaded.tokenizer
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
              f"### Instruction:\n{question}\n\n### Response:\n")
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert p.stdout.strip() == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
