"""``make bench``: peftcli against HF peft + transformers Trainer, side by side in one run.

Workload A (LoRA) and B (QLoRA, NF4 base): the embedded SmolLM2-135M-Instruct, LoRA r=16,
alpha 32, dropout 0.05 on all linear layers, ``completion``-format rows (prompt = the alpaca
template, completion = the output), max_seq_len 256, 4 examples per optimizer step, one epoch,
lr 2e-4 cosine, no warmup. Each tool runs at its fastest setting on this machine: ours with
``model.dtype: auto`` and ``train.mixed_precision: auto``, the peer with ``bf16=True`` only where
the CPU has bf16 units (both decided by ``peftcli.precision.choose``); ``--float32`` puts both in
float32 without autocast (``PEFTCLI_CPU_BF16=0``: what an AVX2-only CPU gets, emulated on one
with bf16 units). Each tool trains in its own process; wall time and peak resident
memory are the whole process's (``wait4``). Both adapters are then scored by one evaluator
(``bench/score.py``, through HF peft). Then how our cost grows with max_seq_len and r.

Data: the first 160 rows of ``../shared/data/alpaca/train.jsonl`` and 100 of its held-out file
when present; otherwise the bundled task data (``peftcli/recipes/data/tasks``), said in the output.

Writes ``bench/results.json`` (with the CPU's model name and its avx2 / avx512f / avx512_bf16 /
amx_bf16 / amx_tile flags, and each tool's precision) and prepends a dated section to
``docs/benchmarks.md``, whose header line names the CPU and those flags.
Usage: python bench/run.py [--rows N] [--skip-scaling] [--no-doc] [--float32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from measure import run_measured

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "bench"
SHARED_ALPACA = Path(os.environ.get("PEFTCLI_SHARED_DATA", ROOT.parent / "shared" / "data")) / "alpaca"
HPARAMS = {"r": 16, "alpha": 32, "dropout": 0.05, "lr": 2e-4, "micro_batch_size": 4, "max_seq_len": 256, "seed": 0}


# ---------------------------------------------------------------------------------------------
# measuring


def matmul_peak() -> dict:
    """This machine's measured matmul throughput (FLOP/s), float32 and bfloat16, 2048² × 2048."""
    import torch

    peaks = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            a @ b
            n += 1
        peaks[name] = 2 * 2048**3 * n / (time.perf_counter() - t0)
    return peaks


def model_flops(examples: list[dict], cfg, lora_params: int) -> float:
    """Useful FLOPs of one epoch of LoRA training (forward + backward), counted per example:

    - the frozen linear layers of the body: 2·N·L forward and 2·N·L for the input gradient
      (their weights need no gradient), N = body linear weights, L = example length;
    - LoRA: 6·N_lora·L (forward, input and weight gradients);
    - attention scores and mixing: 4·L²·d per layer forward, twice that backward (d = heads·head_dim);
    - the output head only at supervised positions: 4·V·H each (forward + input gradient).
    """
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    d_q, d_kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    n_linear = layers * (h * d_q + 2 * h * d_kv + d_q * h + 3 * h * inter)
    total = 0.0
    for e in examples:
        length = len(e["input_ids"])
        supervised = sum(label != -100 for label in e["labels"][1:])
        total += 4 * n_linear * length + 6 * lora_params * length + 12 * layers * length**2 * d_q
        total += 4 * cfg.vocab_size * h * supervised
    return total


# ---------------------------------------------------------------------------------------------
# data and recipes


def prepare_data(n_rows: int, heldout_rows: int = 100) -> dict:
    """Write ``runs/bench/data/{train,heldout}.jsonl`` in completion format; returns where from."""
    from peftcli import data
    from peftcli.recipe import DataSource

    if (SHARED_ALPACA / "train.jsonl").is_file():
        source, train_file, heldout_file = "alpaca (../shared/data/alpaca)", SHARED_ALPACA / "train.jsonl", SHARED_ALPACA / "heldout.jsonl"
    else:
        source = "bundled task data (peftcli/recipes/data/tasks; ../shared/data/alpaca not found)"
        train_file, heldout_file = ROOT / "peftcli/recipes/data/tasks/train.jsonl", ROOT / "peftcli/recipes/data/tasks/heldout.jsonl"
    out = OUT / "data"
    out.mkdir(parents=True, exist_ok=True)
    for name, path, n in (("train", train_file, n_rows), ("heldout", heldout_file, heldout_rows)):
        rows = data.load_rows(DataSource(path=str(path), format="alpaca"))[:n]
        completion = [{"prompt": data.render_prompt(r, "alpaca", None), "completion": r["output"]} for r in rows]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in completion))
    return {"source": source, "train": str(out / "train.jsonl"), "heldout": str(out / "heldout.jsonl"),
            "train_rows": n_rows, "heldout_rows": heldout_rows}


def long_text_rows(tok, length: int, n: int) -> list[dict]:
    """``n`` text rows of at least ``length`` tokens: the train rows' prompts and completions, joined."""
    pool = [json.loads(line) for line in (OUT / "data" / "train.jsonl").read_text().splitlines()]
    texts, i = [], 0
    for _ in range(n):
        parts, count = [], 0
        while count < length:
            row = pool[i % len(pool)]
            i += 1
            piece = row["prompt"] + row["completion"] + "\n\n"
            parts.append(piece)
            count += len(tok(piece)["input_ids"])
        texts.append({"text": "".join(parts)})
    return texts


def our_recipe(name: str, train: str, fmt: str, quantization: str, hp: dict, steps: int | None = None,
               heldout: str | None = None) -> Path:
    """Write ``runs/bench/<name>/recipe.yaml`` for ``peft train``; returns its path."""
    import yaml

    recipe = {
        # our fastest setting on this machine (auto: a bfloat16 base under bf16 autocast where the CPU has bf16
        # units, else float32 without autocast; QLoRA's compute dtype likewise), LoRA weights float32
        "model": {"name_or_path": "smollm2-135m", "quantization": quantization, "dtype": "auto"},
        "method": {"name": "qlora" if quantization == "nf4" else "lora", "r": hp["r"], "alpha": hp["alpha"],
                   "dropout": hp["dropout"], "target_modules": "all-linear"},
        "data": {"train": {"path": train, "format": fmt}, "max_seq_len": hp["max_seq_len"]},
        "train": {"epochs": 1.0, "micro_batch_size": hp["micro_batch_size"], "grad_accum": 1, "lr": hp["lr"],
                  "scheduler": "cosine", "warmup_steps": 0, "max_grad_norm": 1.0, "seed": hp["seed"],
                  "mixed_precision": "auto", "log_every": 4 if steps else 10, "eval_every": 0, "save_every": 0},
        "output": {"dir": str(OUT / name / "ours")},
    }
    if steps:
        recipe["train"]["max_steps"] = steps
    if heldout:
        recipe["data"]["eval"] = {"path": heldout, "format": fmt}
    path = OUT / name / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def validate_estimate(recipe: Path) -> float:
    """``peft validate``'s peak-memory estimate for ``recipe``, GiB."""
    text = subprocess.run([sys.executable, "-m", "peftcli.cli", "validate", str(recipe)], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    return float(re.search(r"peak memory estimate: ([\d.]+) GiB", text).group(1))


# ---------------------------------------------------------------------------------------------
# the workloads


def workload(name: str, quantization: str, d: dict, model_dir: str, examples: list[dict], peak: dict) -> dict:
    """Train with both tools, score both adapters, return the two result rows."""
    from transformers import AutoConfig

    hp = HPARAMS
    wdir = OUT / name
    wdir.mkdir(parents=True, exist_ok=True)
    supervised = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    rows = {}

    recipe = our_recipe(name, d["train"], "completion", quantization, hp)
    print(f"[{name}] peftcli: peft train {recipe.relative_to(ROOT)}", flush=True)
    ours, summary = train_ours(recipe)
    ours["estimate_gib"] = validate_estimate(recipe)
    flops = model_flops(examples, AutoConfig.from_pretrained(model_dir), summary["trainable_params"])
    peak_used = peak["bfloat16"] if summary["mixed_precision"] == "bf16" else peak["float32"]
    ours["mfu"] = flops / ours["train_s"] / peak_used
    ours["precision"] = summary["precision"]
    rows["peftcli"] = ours

    cfg = {**hp, "model_dir": model_dir, "quantization": quantization, "train": d["train"], "out_dir": str(wdir / "peer")}
    print(f"[{name}] peer: HF peft + Trainer", flush=True)
    rows["hf-peft+Trainer"], info = train_peer(cfg, wdir)
    rows["hf-peft+Trainer"]["precision"] = info["precision"]

    for tool, row in rows.items():
        row["supervised_tokens"] = supervised
        row["supervised_tok_per_s"] = supervised / row["train_s"]
        print(f"[{name}] scoring {tool}", flush=True)
        row["heldout_loss"] = score(model_dir, quantization, d["heldout"], row["adapter"], wdir / f"score-{tool}.log")
    base = score(model_dir, quantization, d["heldout"], None, wdir / "score-base.log")
    return {"rows": rows, "base_heldout_loss": base}


def train_ours(recipe: Path, env: dict | None = None) -> tuple[dict, dict]:
    """``peft train RECIPE --overwrite`` (a bench re-measures: an earlier run there is replaced) in
    its own process, its log beside the recipe (``ours.log``).

    Returns:
        (row, summary.json): the row is :func:`run_measured`'s plus train_s (the train loop's
        seconds at the last train event), steps and adapter (the adapter dir).
    """
    import yaml

    run_dir = Path(yaml.safe_load(recipe.read_text())["output"]["dir"])
    row = run_measured([sys.executable, "-m", "peftcli.cli", "train", str(recipe), "--overwrite"], recipe.parent / "ours.log", env)
    summary = json.loads((run_dir / "summary.json").read_text())
    row["train_s"] = train_events(run_dir)[-1]["elapsed_s"]
    row.update(steps=summary["steps"], adapter=str(run_dir / "adapter"))
    return row, summary


def train_events(run_dir: Path) -> list[dict]:
    """The ``train`` events of a run's ``metrics.jsonl``, in order."""
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e.get("event") == "train"]


def train_peer(cfg: dict, wdir: Path, env: dict | None = None) -> tuple[dict, dict]:
    """``bench/peer.py`` on ``cfg`` (written to ``wdir/peer.json``) in its own process, its log
    ``wdir/peer.log``.

    Returns:
        (row, the peer's own peer.json): the row is :func:`run_measured`'s plus train_s (Trainer's
        train_runtime), steps and adapter.
    """
    (wdir / "peer.json").write_text(json.dumps(cfg))
    row = run_measured([sys.executable, str(ROOT / "bench" / "peer.py"), str(wdir / "peer.json")], wdir / "peer.log", env)
    info = json.loads((Path(cfg["out_dir"]) / "peer.json").read_text())
    row.update(train_s=info["train_runtime_s"], steps=info["steps"], adapter=str(Path(cfg["out_dir"]) / "adapter"))
    return row, info


def score(model_dir: str, quantization: str, heldout: str, adapter: str | None, log: Path, device: str = "cpu") -> float:
    """Held-out loss of ``adapter`` (None: the base) by ``bench/score.py`` in its own process, on ``device``."""
    cmd = [sys.executable, str(ROOT / "bench" / "score.py"), model_dir, quantization, heldout, str(HPARAMS["max_seq_len"])]
    run_measured(cmd + ([adapter] if adapter else []) + ["--device", device], log)
    return json.loads(log.read_text().strip().splitlines()[-1])["loss"]


def scaling(d: dict, tok) -> list[dict]:
    """Our tokens/s and peak memory against max_seq_len (full-length text rows, r 16) and r (the
    benchmark rows, max_seq_len 256): 8 optimizer steps of 4 examples, speed over steps 5-8."""
    points = []
    for length in (128, 256, 512, 1024):
        path = OUT / "data" / f"text-{length}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in long_text_rows(tok, length, 32)))
        points.append(("max_seq_len", length, our_recipe(f"scale-len{length}", str(path), "text", "none",
                                                         {**HPARAMS, "max_seq_len": length}, steps=8)))
    for r in (8, 16, 64):
        points.append(("r", r, our_recipe(f"scale-r{r}", d["train"], "completion", "none",
                                          {**HPARAMS, "r": r, "alpha": 2 * r}, steps=8)))
    results = []
    for what, value, recipe in points:
        print(f"[scaling] {what}={value}", flush=True)
        m, _ = train_ours(recipe)
        last = train_events(recipe.parent / "ours")[-1]
        results.append({"vary": what, "value": value, "tokens_per_s": last["tokens_per_s"], "peak_rss_gib": m["peak_rss_gib"]})
    return results


# ---------------------------------------------------------------------------------------------
# report


def report(results: dict) -> str:
    """The markdown tables of one benchmark run."""
    commit = f", commit {results['commit']}" if results.get("commit") else ""
    lines = [f"## {results['date']}{commit} — {results['machine']}{precision_note(results)}", "",
             f"Data: {results['data']['source']}; {results['data']['train_rows']} train rows (one epoch, "
             f"{HPARAMS['micro_batch_size']} examples per step), {results['data']['heldout_rows']} held-out rows. "
             f"Matmul peak measured here: {results['peak']['float32'] / 1e9:.0f} GFLOP/s float32, "
             f"{results['peak']['bfloat16'] / 1e9:.0f} GFLOP/s bfloat16.", ""]
    for name, w in results["workloads"].items():
        ours, peer = w["rows"]["peftcli"], w["rows"]["hf-peft+Trainer"]
        lines += [f"### Workload {name}", "",
                  "| tool | wall (process) | train loop | supervised tok/s | peak RSS | held-out loss | MFU |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for tool, r in w["rows"].items():
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "—"
            lines.append(f"| {tool} | {r['wall_s']:.1f} s | {r['train_s']:.1f} s | {r['supervised_tok_per_s']:.0f} | "
                         f"{r['peak_rss_gib']:.2f} GiB | {r['heldout_loss']:.4f} | {mfu} |")
        lines += ["", f"Ratios peftcli / peer: wall **{ours['wall_s'] / peer['wall_s']:.2f}×**, "
                      f"peak RSS **{ours['peak_rss_gib'] / peer['peak_rss_gib']:.2f}×**, supervised tok/s "
                      f"**{ours['supervised_tok_per_s'] / peer['supervised_tok_per_s']:.2f}×**, held-out loss "
                      f"{100 * (ours['heldout_loss'] / peer['heldout_loss'] - 1):+.2f}% (untrained base "
                      f"{w['base_heldout_loss']:.4f}). `peft validate` estimated {ours['estimate_gib']:.2f} GiB "
                      f"({100 * (ours['estimate_gib'] / ours['peak_rss_gib'] - 1):+.0f}% of measured).", ""]
    if results.get("scaling"):
        lines += ["### How our cost grows (LoRA, 8 steps of 4 examples; speed over steps 5–8)", "",
                  "| varied | value | tokens/s | peak RSS |", "|---|---:|---:|---:|"]
        for p in results["scaling"]:
            lines.append(f"| {p['vary']} | {p['value']} | {p['tokens_per_s']:.0f} | {p['peak_rss_gib']:.2f} GiB |")
        lines.append("")
    return "\n".join(lines)


def cpu_record() -> dict:
    """This CPU for results.json: its model name and which of the flags that decide bf16 speed it has."""
    from peftcli import precision

    name, flags = precision.cpu_info()
    return {"model": name or platform.processor() or platform.machine(),
            "flags": {f: f in flags for f in precision.FLAGS}, "bf16_units": precision.cpu_has_bf16_units()}


def machine_line(cpu: dict) -> str:
    """``2 CPU cores, AMD EPYC (avx2 avx512f avx512_bf16)``: the report header's machine."""
    have = " ".join(f for f, on in cpu["flags"].items() if on) or "none of " + ", ".join(cpu["flags"])
    return f"{os.cpu_count()} CPU cores, {cpu['model']} ({have})"


def precision_note(results: dict) -> str:
    """The header's precision: forced float32 on both sides, or what each tool chose."""
    if results.get("float32"):
        return "; float32 on both sides, no autocast (--float32: PEFTCLI_CPU_BF16=0, as on an AVX2-only CPU)"
    first = next(iter(results["workloads"].values()), None)
    if first is None:
        return ""
    ours, peer = first["rows"]["peftcli"]["precision"], first["rows"]["hf-peft+Trainer"]["precision"]
    linear = f" (linear weights {ours['linear_dtype']})" if ours.get("linear_dtype") else ""
    return (f"; ours: base {ours['dtype']}{linear}, autocast {ours['mixed_precision']}; "
            f"peer: {'bf16=True' if peer['bf16'] else 'float32'} ({ours['reason']})")


def git_commit() -> str | None:
    """The checkout's short commit, with "+ local changes" when tracked files differ from it; None
    outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + (" + local changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def relative_paths(obj):
    """``obj`` with every string path under the checkout written relative to it (results.json is
    committed; absolute paths would name one machine's directories)."""
    if isinstance(obj, dict):
        return {k: relative_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relative_paths(v) for v in obj]
    if isinstance(obj, str) and obj.startswith(str(ROOT) + os.sep):
        return obj[len(str(ROOT)) + 1:]
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=160, help="train rows (one epoch)")
    ap.add_argument("--workloads", nargs="*", default=["A", "B"])
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--no-doc", action="store_true", help="do not prepend to docs/benchmarks.md")
    ap.add_argument("--float32", action="store_true", help="both tools in float32 without autocast "
                    "(PEFTCLI_CPU_BF16=0: an AVX2-only CPU's setting, on any CPU)")
    args = ap.parse_args()
    if args.float32:
        os.environ["PEFTCLI_CPU_BF16"] = "0"  # every child process (ours, the peer, validate) chooses as an AVX2-only CPU

    from peftcli import data, models

    model_dir = models.resolve("smollm2-135m")  # converts the embedded GGUF once, before any timing
    tok = models.load_tokenizer(model_dir)
    d = prepare_data(args.rows)
    print(f"data: {d['source']}", flush=True)
    from peftcli.recipe import DataSource

    examples, _ = data.tokenize_rows(data.load_rows(DataSource(path=d["train"], format="completion")), "completion",
                                     tok, HPARAMS["max_seq_len"], False, d["train"])
    cpu = cpu_record()
    results = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "machine": machine_line(cpu), "cpu": cpu,
               "float32": args.float32, "hparams": HPARAMS, "data": d, "peak": matmul_peak(), "workloads": {}}
    for name in args.workloads:
        results["workloads"][name] = workload(name, "nf4" if name == "B" else "none", d, model_dir, examples, results["peak"])
    if not args.skip_scaling:
        results["scaling"] = scaling(d, tok)
    (ROOT / "bench" / "results.json").write_text(json.dumps(relative_paths(results), indent=1) + "\n")
    text = report(results)
    print(text)
    if not args.no_doc:
        doc = ROOT / "docs" / "benchmarks.md"
        head = doc.read_text().split("\n## ", 1) if doc.exists() else ["# Benchmarks\n", ""]
        doc.write_text(head[0].rstrip() + "\n\n" + text + ("\n## " + head[1] if len(head) > 1 else ""))


if __name__ == "__main__":
    main()
