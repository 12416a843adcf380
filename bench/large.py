"""A larger model row: how cost grows with model size, and where QLoRA pays on a 24 GB machine.

A randomly initialised 1B-class Llama (no download): SmolLM2-135M's config (its tokenizer and
vocabulary of 49,152, tied embeddings, RoPE, norms) with the body of Llama 3.2 1B — hidden 2048,
16 layers, 32 heads of 64, 8 key/value heads, intermediate 8192: 1,073,809,408 parameters
(:func:`param_count`). Saved once, in bfloat16 safetensors (what 1B-class checkpoints ship as:
2.1 GB on disk instead of 4.3; each tool loads it in its own dtype), to ``runs/bench/large/llama-1b/``.

Then LoRA and QLoRA (NF4) with both tools, each in its own process (:func:`measure.run_measured`:
wall, peak RSS): ours (``peft train`` on ``bench/run.py``'s recipe, so the same precision as
``make bench``, with ``model.name_or_path`` set to that dir) and the peer (``bench/peer.py``:
HF peft + Trainer). ``make bench``'s hyperparameters (r 16, alpha 32, all linear layers, 4
examples per step, max_seq_len 256), 6 optimizer steps; every example is exactly 256 tokens
(the bench train rows joined, cut at 256), so a step is 1,024 tokens for both tools and
tokens/s is counted over the steps after the first 2 (warm-up). The same rows for the embedded
SmolLM2-135M beside it. Random weights: the data's tokens are what costs, not what the model knows.
Prints a markdown table (tool, method, parameters, tokens/s, peak RSS, wall) with the ratios
peftcli / peer, and writes the rows to ``runs/bench/large/results-<model>.json``.

    python bench/large.py                 # the 1B rows and the 135M rows (about 30 min on 2 cores: --estimate)
    python bench/large.py --estimate      # no training: parameters, memory estimate, time estimate
    python bench/large.py --tiny          # the whole flow on a 2-layer model (2.5 min on 2 busy cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import run  # bench/run.py: the recipe, the data, the measured processes

ROOT = run.ROOT

OUT = run.OUT / "large"
SHAPES = {  # hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size
    "llama-1b": (2048, 16, 32, 8, 8192),
    "tiny": (256, 2, 4, 2, 1024),
}
STEPS, WARMUP = 6, 2
RUNTIME_GIB = 0.5  # python + torch + transformers + peft imported: 0.46 GiB peak RSS measured
PROMPT = "Continue the text.\n\n"


# ---------------------------------------------------------------------------------------------
# the model


def llama_config(shape: tuple[int, int, int, int, int], base=None):
    """``base`` (default: the embedded SmolLM2-135M's config) with the body ``shape``
    (hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size);
    head_dim = hidden_size / num_attention_heads."""
    import copy

    from transformers import AutoConfig

    from peftcli import models

    cfg = copy.deepcopy(base) if base is not None else AutoConfig.from_pretrained(models.resolve("smollm2-135m"))
    hidden, layers, heads, kv_heads, inter = shape
    cfg.update({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": kv_heads, "intermediate_size": inter, "head_dim": hidden // heads})
    return cfg


def param_count(cfg) -> int:
    """A Llama's parameters by formula: embeddings V·h (and an untied head V·h); per layer
    q and o h·(heads·head_dim) each, k and v h·(kv_heads·head_dim) each, gate/up/down h·i each,
    two norms h; the final norm h. No biases."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    d_q, d_kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = 2 * h * d_q + 2 * h * d_kv + 3 * h * i + 2 * h
    return v * h * (1 if cfg.tie_word_embeddings else 2) + cfg.num_hidden_layers * layer + h


def linear_params(cfg) -> int:
    """The body's linear weights (what NF4 quantises and LoRA wraps)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    d_q, d_kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_hidden_layers * (2 * h * d_q + 2 * h * d_kv + 3 * h * i)


def lora_params(cfg, r: int) -> int:
    """LoRA's trainable parameters on every linear layer of the body: r·(in + out) each."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    d_q, d_kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_hidden_layers * r * (2 * (h + d_q) + 2 * (h + d_kv) + 3 * (h + i))


def save_random_llama(name: str, cfg) -> Path:
    """``runs/bench/large/<name>/``: a random ``cfg`` Llama (seed 0, bfloat16 safetensors) and the
    SmolLM2 tokenizer; kept when an earlier call saved the same config."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftcli import models

    out = OUT / name
    if (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file():
        saved = json.loads((out / "config.json").read_text())
        if all(saved.get(k) == v for k, v in cfg.to_dict().items() if k in SHAPE_KEYS):
            return out
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    models.load_tokenizer(models.resolve("smollm2-135m")).save_pretrained(out)
    return out


SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "tie_word_embeddings")


# ---------------------------------------------------------------------------------------------
# the data


def full_length_rows(tok, n: int, length: int) -> Path:
    """``runs/bench/large/data/train-<length>.jsonl``: ``n`` completion rows (a short prompt, the
    bench train rows joined as the completion) that tokenise to exactly ``length`` tokens each.

    Raises:
        SystemExit: a row came out shorter (then tokens/s would not be comparable).
    """
    from peftcli import data
    from peftcli.recipe import DataSource

    run.prepare_data(160)
    path = OUT / "data" / f"train-{length}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": PROMPT, "completion": r["text"]} for r in run.long_text_rows(tok, length, n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = data.tokenize_rows(data.load_rows(DataSource(path=str(path), format="completion")), "completion",
                                     tok, length, False, str(path))
    if sorted({len(e["input_ids"]) for e in examples}) != [length]:
        raise SystemExit(f"{path}: every row should be {length} tokens")
    return path


# ---------------------------------------------------------------------------------------------
# the runs


def steady_tokens_per_s(step_ends: list[float], tokens_per_step: int, warmup: int = WARMUP) -> float:
    """Tokens/s over the steps after the first ``warmup``: ``step_ends`` are the seconds (any
    origin) at which each optimizer step ended.

    Raises:
        ValueError: no step after the warm-up.
    """
    if len(step_ends) <= warmup or warmup < 1:
        raise ValueError(f"{len(step_ends)} steps: need more than the {warmup} warm-up steps (and at least 1)")
    return (len(step_ends) - warmup) * tokens_per_step / (step_ends[-1] - step_ends[warmup - 1])


def ours(label: str, model_dir: str, quantization: str, train: Path, steps: int) -> dict:
    """``peft train`` on bench/run.py's recipe with this model, ``steps`` steps, a log line each."""
    import yaml

    name = f"large/{label}"
    recipe_path = run.our_recipe(name, str(train), "completion", quantization, run.HPARAMS, steps=steps)
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["model"]["name_or_path"] = model_dir
    recipe["train"]["log_every"] = 1
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(f"[{label}] peftcli: peft train {recipe_path.relative_to(ROOT)}", flush=True)
    row, summary = run.train_ours(recipe_path)
    ends = [e["elapsed_s"] for e in run.train_events(Path(recipe["output"]["dir"]))]
    return {**row, "step_ends": ends, "trainable": summary["trainable_params"], "base": summary["base_params"],
            "mixed_precision": summary["mixed_precision"]}


def peer(label: str, model_dir: str, quantization: str, train: Path, steps: int) -> dict:
    """``bench/peer.py`` (HF peft + Trainer), ``steps`` steps."""
    wdir = OUT / label
    cfg = {**run.HPARAMS, "model_dir": model_dir, "quantization": quantization, "train": str(train),
           "out_dir": str(wdir / "peer"), "max_steps": steps}
    print(f"[{label}] peer: HF peft + Trainer", flush=True)
    row, info = run.train_peer(cfg, wdir)
    return {**row, "step_ends": info["step_end_s"]}


def measure_model(model: str, model_dir: str, train: Path, steps: int, tools: list[str]) -> list[dict]:
    """Every (tool, method) row of one model."""
    tokens_per_step = run.HPARAMS["micro_batch_size"] * run.HPARAMS["max_seq_len"]
    rows = []
    for method, quantization in (("LoRA", "none"), ("QLoRA", "nf4")):
        for tool, train_fn in (("peftcli", ours), ("hf-peft+Trainer", peer)):
            if tool not in tools:
                continue
            row = train_fn(f"{model}-{method.lower()}", model_dir, quantization, train, steps)
            row.update(model=model, tool=tool, method=method,
                       tokens_per_s=steady_tokens_per_s(row["step_ends"], tokens_per_step))
            rows.append(row)
        if len(rows) >= 2 and rows[-2]["method"] == method and "trainable" in rows[-2]:
            rows[-1].setdefault("trainable", rows[-2]["trainable"])  # the same LoRA on the same base
            rows[-1].setdefault("base", rows[-2]["base"])
    return rows


# ---------------------------------------------------------------------------------------------
# estimates: does every variant fit in 24 GB, how long the row takes


def memory_budget_gib(cfg, r: int, tokens: int) -> dict[str, float]:
    """Peak memory by formula, GiB, per variant ("LoRA", "QLoRA"): the peer's layout (ours keeps
    less). On make bench's SmolLM2-135M it gives 5.88 / 5.34 GiB against the peer's measured
    5.18 / 5.45 GiB (bench/results.json), so read it as ±15%:

    - frozen weights in float32 (4 B; the peer's dtype, and ours where bf16 is not fast), plus
      autocast's bfloat16 copies of the linear weights (2 B); QLoRA's body linears NF4 with
      double-quantised absmax (0.5 B + 1 B per 64 + 4 B per 16,384), the embeddings and norms float32;
    - LoRA in float32 with its gradient and AdamW's two moments: 16 B per trainable parameter;
    - activations kept for backward per token and layer, under bf16 autocast with HF peft's dropout
      copies: counted 80·h + 15·i bytes (h, i: hidden, intermediate), taken twice: make bench's
      135M peer peaked at 5.18 GiB, 1.75× this count's per-layer share; plus the full logits in
      bfloat16 and float32 with the loss's float32 copies: 14·V bytes per token;
    - :data:`RUNTIME_GIB` for the interpreter and libraries.
    """
    n, lin = param_count(cfg), linear_params(cfg)
    h, i = cfg.hidden_size, cfg.intermediate_size
    activations = tokens * (2 * cfg.num_hidden_layers * (80 * h + 15 * i) + 14 * cfg.vocab_size)
    common = 16 * lora_params(cfg, r) + activations
    weights = {"LoRA": 4 * n + 2 * lin, "QLoRA": lin * (0.5 + 1 / 64 + 4 / 16384) + 4 * (n - lin)}
    return {k: (w + common) / 2**30 + RUNTIME_GIB for k, w in weights.items()}


def fits_24gb(estimate_gib: float) -> bool:
    """The estimate plus its 15% fits in 24 GB (24·10⁹ bytes, what such a machine has)."""
    return 1.15 * estimate_gib * 2**30 < 24e9


def step_flops(cfg, r: int, tokens_per_example: int, examples: int) -> float:
    """FLOPs of one optimizer step of LoRA on full-length examples (:func:`run.model_flops`)."""
    ex = [{"input_ids": [0] * tokens_per_example, "labels": [0] * tokens_per_example}] * examples
    return run.model_flops(ex, cfg, lora_params(cfg, r))


def achieved_flops(results: dict | None, peak: dict | None) -> dict[str, float]:
    """Each tool's achieved FLOP/s in make bench's train loop (workload A: MFU × the matmul peak it
    was measured against, bench/results.json); without results, 30% (ours) and 15% (the peer)
    of this machine's bfloat16 ``peak``."""
    if not results:
        return {"peftcli": 0.30 * peak["bfloat16"], "hf-peft+Trainer": 0.15 * peak["bfloat16"]}
    a = results["workloads"]["A"]["rows"]
    ours_flops = a["peftcli"]["mfu"] * results["peak"]["bfloat16"]  # make bench's recipe: bf16 on that CPU
    return {"peftcli": ours_flops, "hf-peft+Trainer": ours_flops * a["peftcli"]["train_s"] / a["hf-peft+Trainer"]["train_s"]}


def wall_estimate_s(cfg, r: int, achieved: float, steps: int = STEPS) -> float:
    """One tool's LoRA + QLoRA runs on ``cfg``: ``steps`` steps each at ``achieved`` FLOP/s, QLoRA's
    steps 1.2× LoRA's (make bench: 1.19 ours, 1.09 the peer), and per process about 15 s of start-up
    plus 8 s per billion parameters to load (a guess, not measured at 1B)."""
    hp = run.HPARAMS
    per_step = step_flops(cfg, r, hp["max_seq_len"], hp["micro_batch_size"]) / achieved
    return 2 * (15 + 8 * param_count(cfg) / 1e9) + steps * per_step * (1 + 1.2)


def estimate(cfg, small, r: int, achieved: dict[str, float]) -> list[str]:
    """Lines: parameters, the memory budget (:func:`memory_budget_gib`) and the wall time of the
    whole run (:func:`wall_estimate_s` for ``cfg`` and the 135M config ``small``)."""
    hp = run.HPARAMS
    flops = step_flops(cfg, r, hp["max_seq_len"], hp["micro_batch_size"])
    lines = [f"parameters: {param_count(cfg):,} ({linear_params(cfg):,} in the body's linear layers), "
             f"LoRA r {r}: {lora_params(cfg, r):,} trainable; one step of {hp['micro_batch_size']}×{hp['max_seq_len']} "
             f"tokens: {flops / 1e12:.2f} TFLOP"]
    budget = memory_budget_gib(cfg, r, hp["micro_batch_size"] * hp["max_seq_len"])
    lines.append("memory estimate (the peer's layout, ±15%; ours keeps less): " + ", ".join(
        f"{k} {v:.1f} GiB{' — fits in 24 GB' if fits_24gb(v) else ' — DOES NOT FIT in 24 GB'}" for k, v in budget.items()))
    total = 0.0
    for tool, rate in achieved.items():
        big, little = wall_estimate_s(cfg, r, rate), wall_estimate_s(small, r, rate)
        total += big + little
        lines.append(f"{tool} at {rate / 1e9:.0f} GFLOP/s: {flops / rate:.0f} s per LoRA step; LoRA + QLoRA, {STEPS} steps "
                     f"each: about {big / 60:.0f} min (135M: {little / 60:.1f} min)")
    lines.append(f"the whole run: about {total / 60:.0f} min, plus the model's creation once")
    return lines


# ---------------------------------------------------------------------------------------------
# report


def table(rows: list[dict]) -> str:
    """The markdown table of the rows and, per model and method, the ratios peftcli / peer."""
    lines = ["| model | tool | method | params (trainable / base) | tokens/s | peak RSS | wall |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        params = f"{r['trainable'] / 1e6:.1f} M / {r['base'] / 1e9:.2f} B" if "trainable" in r else "—"
        lines.append(f"| {r['model']} | {r['tool']} | {r['method']} | {params} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_rss_gib']:.2f} GiB | {r['wall_s']:.0f} s |")
    lines.append("")
    by = {(r["model"], r["method"], r["tool"]): r for r in rows}
    for (model, method, tool), o in by.items():
        p = by.get((model, method, "hf-peft+Trainer"))
        if tool == "peftcli" and p:
            lines.append(f"- {model} {method}, peftcli / peer: {ratios(o, p)}")
    return "\n".join(lines)


def ratios(ours_row: dict, peer_row: dict) -> str:
    """``tokens/s 2.10×, peak RSS 0.40×, wall 0.45×`` (ours / the peer's)."""
    return ", ".join(f"{label} **{ours_row[k] / peer_row[k]:.2f}×**"
                     for label, k in (("tokens/s", "tokens_per_s"), ("peak RSS", "peak_rss_gib"), ("wall", "wall_s")))


def results_note(results: dict | None) -> str:
    """make bench's 135M row (bench/results.json: one epoch of 40 steps, supervised tokens/s)."""
    if not results:
        return ""
    parts = []
    for name, w in results["workloads"].items():
        o, p = w["rows"]["peftcli"], w["rows"]["hf-peft+Trainer"]
        parts.append(f"workload {name}: peftcli {o['supervised_tok_per_s']:.0f} supervised tok/s, {o['peak_rss_gib']:.2f} GiB; "
                     f"peer {p['supervised_tok_per_s']:.0f}, {p['peak_rss_gib']:.2f} GiB")
    return f"make bench on SmolLM2-135M ({results['date']}, {results['machine']}): " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of hidden 256 (the flow in about a minute)")
    ap.add_argument("--estimate", action="store_true", help="print parameters, memory budget and time estimate; train nothing")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--no-135m", action="store_true", help="skip the SmolLM2-135M rows")
    ap.add_argument("--tools", nargs="*", default=["peftcli", "hf-peft+Trainer"])
    args = ap.parse_args()

    from transformers import AutoConfig

    from peftcli import models

    name = "tiny" if args.tiny else "llama-1b"
    cfg = llama_config(SHAPES[name])
    results_file = ROOT / "bench" / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else None
    if args.estimate:
        small = AutoConfig.from_pretrained(models.resolve("smollm2-135m"))
        print("\n".join(estimate(cfg, small, run.HPARAMS["r"], achieved_flops(results, None if results else run.matmul_peak()))))
        return
    small_dir = models.resolve("smollm2-135m")
    tok = models.load_tokenizer(small_dir)
    train = full_length_rows(tok, run.HPARAMS["micro_batch_size"] * args.steps, run.HPARAMS["max_seq_len"])
    model_dir = save_random_llama(name, cfg)
    print(f"{name}: {param_count(cfg):,} parameters, {model_dir.relative_to(ROOT)} (bfloat16 safetensors)", flush=True)
    rows = measure_model(name, str(model_dir), train, args.steps, args.tools)
    if not (args.tiny or args.no_135m):
        rows += measure_model("smollm2-135m", small_dir, train, args.steps, args.tools)
    (OUT / f"results-{name}.json").write_text(json.dumps(run.relative_paths(
        {"date": time.strftime("%Y-%m-%d"), "commit": run.git_commit(), "steps": args.steps, "warmup": WARMUP,
         "rows": rows}), indent=1) + "\n")
    print(f"\n{args.steps} steps of {run.HPARAMS['micro_batch_size']}×{run.HPARAMS['max_seq_len']} tokens, "
          f"tokens/s over steps {WARMUP + 1}-{args.steps}\n")
    print(table(rows))
    if note := results_note(results):
        print(f"\n{note}")


if __name__ == "__main__":
    sys.exit(main())
