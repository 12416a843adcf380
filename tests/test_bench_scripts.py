"""bench/large.py and bench/gpu_check.py --bench: their pure helpers (no training, seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import large  # noqa: E402


def base_config(vocab_size: int = 49152):
    """SmolLM2's vocabulary and tied embeddings, without the embedded model (a plain LlamaConfig)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=True)


def test_1b_parameter_count_by_formula_matches_the_model():
    from transformers import AutoModelForCausalLM

    cfg = large.llama_config(large.SHAPES["llama-1b"], base_config())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert large.param_count(cfg) == sum(p.numel() for p in model.parameters()) == 1_073_809_408
    body_linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n)
    assert large.linear_params(cfg) == body_linear


def test_lora_parameter_count_matches_hf_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = large.llama_config(large.SHAPES["tiny"], base_config(320))
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=16, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert large.lora_params(cfg, 16) == trainable


def test_every_1b_variant_fits_in_24_gb():
    cfg = large.llama_config(large.SHAPES["llama-1b"], base_config())
    budget = large.memory_budget_gib(cfg, 16, 4 * 256)
    assert set(budget) == {"LoRA", "QLoRA"}
    assert budget["LoRA"] > 6 * 1_073_809_408 / 2**30  # at least the float32 weights and their bf16 copies
    assert budget["QLoRA"] < budget["LoRA"]
    assert large.fits_24gb(budget["LoRA"]) and large.fits_24gb(budget["QLoRA"])
    assert not large.fits_24gb(21.0)  # 21 GiB + 15% is over 24·10⁹ bytes


def test_steady_tokens_per_s_counts_the_steps_after_warm_up():
    # steps 3 and 4 (200 tokens) between the end of step 2 (3.0 s) and of step 4 (5.5 s)
    assert large.steady_tokens_per_s([1.0, 3.0, 4.0, 5.5], 100, warmup=2) == pytest.approx(80.0)
    with pytest.raises(ValueError):
        large.steady_tokens_per_s([1.0, 3.0], 100, warmup=2)


def row(tool: str, method: str, tps: float, rss: float, wall: float, **extra) -> dict:
    return {"model": "m", "tool": tool, "method": method, "tokens_per_s": tps, "peak_rss_gib": rss, "wall_s": wall, **extra}


def test_large_table_and_ratios():
    rows = [row("peftcli", "LoRA", 200, 2.0, 30, trainable=11_272_192, base=1_073_809_408),
            row("hf-peft+Trainer", "LoRA", 100, 8.0, 60, trainable=11_272_192, base=1_073_809_408),
            row("peftcli", "QLoRA", 150, 1.0, 40)]
    text = large.table(rows)
    assert "| m | peftcli | LoRA | 11.3 M / 1.07 B | 200 | 2.00 GiB | 30 s |" in text
    assert "- m LoRA, peftcli / peer: tokens/s **2.00×**, peak RSS **0.25×**, wall **0.50×**" in text
    assert "QLoRA, peftcli / peer" not in text  # no peer row for it: no ratio


def test_gpu_bench_report_ratios_and_missing_gpu_memory():
    def r(wall, train, tps, gpu, rss, loss):
        return {"wall_s": wall, "train_s": train, "supervised_tok_per_s": tps, "peak_gpu_gib": gpu,
                "peak_rss_gib": rss, "heldout_loss": loss}

    results = [{"name": "A", "base_heldout_loss": 2.0,
                "rows": {"peftcli": r(30, 20, 300, 1.5, 2.0, 1.01), "hf-peft+Trainer": r(60, 50, 100, 6.0, 4.0, 1.0)}},
               {"name": "B", "base_heldout_loss": 2.0,
                "rows": {"peftcli": r(30, 20, 300, None, 2.0, 1.0), "hf-peft+Trainer": r(60, 50, 100, None, 4.0, 1.0)}}]
    text = gpu_check.bench_report(results, "cuda")
    assert ("Ratios peftcli / peer: wall 0.50×, train-loop supervised tok/s 3.00×, peak GPU memory 0.25×, "
            "peak RSS 0.50×, held-out loss +1.00% (untrained base 2.0000).") in text
    assert "| peftcli | 30.0 s | 20.0 s | 300 | 1.50 GiB | 2.00 GiB | 1.0100 |" in text
    assert "peak GPU memory —, peak RSS 0.50×" in text  # no figure off CUDA: no ratio
    assert gpu_check.ratio(1.0, None) == "—" and gpu_check.ratio(1.0, 4.0) == "0.25×"
