"""``make results``: every method on real public data (SST-2, Alpaca), scored by ``peft eval``.

Needs ``../shared/data/{sst2,alpaca}`` (not bundled: their licences differ from ours); without
them it says so and exits 0. Everything else is fixed here, so one command reproduces the tables
of ``docs/results.md``:

- SST-2: a 2,000-row subset of ``sst2/train.jsonl`` (shuffled with seed 0), as chat rows
  (user: the question and the sentence; assistant: "positive" / "negative"); 200 optimizer steps of
  8 examples (1,600 examples). Accuracy on all 872 rows of ``sst2/validation.jsonl`` with
  ``peft eval --labels negative,positive``: by label likelihood and by greedy answer.
- Alpaca: a 2,000-row subset of ``alpaca/train.jsonl`` (shuffled with seed 0), alpaca format,
  max_seq_len 256; 30 steps of 8 examples (240 examples). Held-out loss and perplexity (``--no-exact-match``)
  on the first 300 rows of ``alpaca/heldout.jsonl``.

Per method: trainable parameters, the metrics, training time and peak resident memory of the
``peft train`` process. Rows are kept in ``runs/results/<task>-<method>.json`` so ``--only``
re-measures some and ``--missing`` the rest. Usage:
python bench/results.py [--only METHOD ... | --missing] [--tasks sst2 alpaca] [--reference prompt_tuning p_tuning]

``--reference`` (default: prompt_tuning; none with ``--only``) also trains those soft-prompt
methods with HF peft + Trainer on the same SST-2 rows, steps and learning rate
(``bench/hf_reference.py``), and ours once more in HF's precision (float32 base, bf16 autocast);
all scored by the same ``peft eval``: a method that trails is then the method, the setting, or a
bug of ours.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import yaml
from measure import run_measured

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PEFTCLI_SHARED_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "runs" / "results"
DOC = ROOT / "docs" / "results.md"
QUESTION = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"

LORA = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
METHODS = {  # method block, learning rate, model.quantization
    "lora": (LORA, 1e-3, "none"),
    "qlora": ({**LORA, "name": "qlora"}, 1e-3, "nf4"),
    "dora": ({**LORA, "dora": True}, 1e-3, "none"),
    "adapter-houlsby": ({"name": "adapter", "variant": "houlsby", "reduction_factor": 16}, 1e-3, "none"),
    "adapter-pfeiffer": ({"name": "adapter", "variant": "pfeiffer", "reduction_factor": 16}, 1e-3, "none"),
    "prompt_tuning": ({"name": "prompt_tuning", "num_virtual_tokens": 20, "init": "text",
                       "init_text": "Answer with the bare value only."}, 3e-2, "none"),
    "p_tuning": ({"name": "p_tuning", "num_virtual_tokens": 20, "encoder": "mlp"}, 1e-3, "none"),
    "prefix_tuning": ({"name": "prefix_tuning", "num_virtual_tokens": 20, "projection": True}, 1e-3, "none"),
    "ia3": ({"name": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, 1e-2, "none"),
}
TASKS = {
    "sst2": {"steps": 200, "format": "chat", "max_seq_len": 128, "labels": "negative,positive"},
    "alpaca": {"steps": 30, "format": "alpaca", "max_seq_len": 256, "labels": None},
}


def prepare() -> dict[str, dict[str, str]]:
    """Write the task files under runs/results/data; returns {task: {"train": path, "eval": path}}."""
    out = OUT / "data"
    out.mkdir(parents=True, exist_ok=True)
    read = lambda p: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]  # noqa: E731
    write = lambda p, rows: p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")  # noqa: E731

    def chat(r):
        return {"messages": [{"role": "user", "content": QUESTION + r["sentence"].strip()},
                             {"role": "assistant", "content": r["label_text"]}]}

    sst = read(SHARED / "sst2" / "train.jsonl")
    random.Random(0).shuffle(sst)
    write(out / "sst2-train.jsonl", [chat(r) for r in sst[:2000]])
    write(out / "sst2-validation.jsonl", [chat(r) for r in read(SHARED / "sst2" / "validation.jsonl")])
    alpaca = read(SHARED / "alpaca" / "train.jsonl")
    random.Random(0).shuffle(alpaca)
    write(out / "alpaca-train.jsonl", alpaca[:2000])
    write(out / "alpaca-heldout.jsonl", read(SHARED / "alpaca" / "heldout.jsonl")[:300])
    return {"sst2": {"train": str(out / "sst2-train.jsonl"), "eval": str(out / "sst2-validation.jsonl")},
            "alpaca": {"train": str(out / "alpaca-train.jsonl"), "eval": str(out / "alpaca-heldout.jsonl")}}


def eval_args(task: str) -> list[str]:
    """``peft eval`` options for a task: label accuracy (likelihood and greedy answer) for SST-2,
    loss and perplexity only (no greedy exact match) for Alpaca."""
    labels = TASKS[task]["labels"]
    return ["--no-exact-match"] + (["--labels", labels] if labels else [])


def base_scores(task: str, files: dict) -> dict:
    """The untrained base model's scores on a task, measured once (``runs/results/<task>-base.json``)."""
    out = OUT / f"{task}-base.json"
    if not out.exists():
        recipe = write_recipe(f"{task}-base", task, METHODS["lora"], files)  # no adapter in its run dir: base only
        print(f"[{task}-base] scoring the base model", flush=True)
        run_measured([sys.executable, "-m", "peftcli.cli", "eval", str(recipe), "--json", *eval_args(task)], out)
    return json.loads(out.read_text().strip().splitlines()[-1])["base"]


def write_recipe(name: str, task: str, method: tuple, files: dict, dtype: str = "bfloat16") -> Path:
    """``runs/results/recipes/<name>.yaml`` for one method on one task."""
    block, lr, quantization = method
    spec = TASKS[task]
    recipe = {
        # frozen base (and QLoRA compute) in bfloat16, trained weights float32: the fastest setting on this CPU
        "model": {"name_or_path": "smollm2-135m", "quantization": quantization, "dtype": dtype},
        "method": block,
        "data": {"train": {"path": files["train"], "format": spec["format"]},
                 "eval": {"path": files["eval"], "format": spec["format"]}, "max_seq_len": spec["max_seq_len"]},
        "train": {"max_steps": spec["steps"], "micro_batch_size": 8, "grad_accum": 1, "lr": lr, "scheduler": "cosine",
                  "warmup_steps": 10, "eval_every": 0, "save_every": 0, "log_every": 10, "seed": 0},
        "output": {"dir": str(OUT / name)},
    }
    path = OUT / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def measure(task: str, method: str, files: dict, dtype: str = "bfloat16") -> dict:
    """Train one method on one task (frozen base in ``dtype``) and score the adapter; returns its
    row, written to ``runs/results/<task>-<method>[-<dtype>].json``."""
    name = f"{task}-{method}" + ("" if dtype == "bfloat16" else f"-{dtype}")
    path = write_recipe(name, task, METHODS[method], files, dtype)
    print(f"[{name}] training", flush=True)
    train = run_measured([sys.executable, "-m", "peftcli.cli", "train", str(path)], OUT / f"{name}.train.log")
    summary = json.loads((OUT / name / "summary.json").read_text())
    events = [json.loads(line) for line in (OUT / name / "metrics.jsonl").read_text().splitlines()]
    log = OUT / f"{name}.eval.json"
    print(f"[{name}] scoring", flush=True)
    run_measured([sys.executable, "-m", "peftcli.cli", "eval", str(OUT / name), "--json", "--no-base", *eval_args(task)], log)
    scores = json.loads(log.read_text().strip().splitlines()[-1])
    label = method if dtype == "bfloat16" else f"{method} ({dtype} base)"
    row = {"task": task, "method": label, "trainable_params": summary["trainable_params"],
           "train_s": [e for e in events if e.get("event") == "train"][-1]["elapsed_s"], "process_s": train["wall_s"],
           "peak_rss_gib": train["peak_rss_gib"], "steps": summary["steps"],
           "examples": summary["steps"] * summary["examples_per_step"],
           "tokens_seen": summary["tokens_seen"], "adapted": scores["adapted"]}
    (OUT / f"{name}.json").write_text(json.dumps(row, indent=1))
    return row


def reference(task: str, method: str, files: dict) -> dict:
    """HF peft + Trainer training ``method`` (a soft-prompt method) in the setting of our row
    (``bench/hf_reference.py``: float32 base, bf16 autocast), its adapter scored by the same
    ``peft eval``; returns its row, written to ``runs/results/<task>-<method>-hf-peft.json``."""
    from peftcli import models

    block, lr, _ = METHODS[method]
    spec, name = TASKS[task], f"{task}-{method}-hf-peft"
    cfg = {"method": method, "model_dir": models.resolve("smollm2-135m"), "train": files["train"], "format": spec["format"],
           "max_seq_len": spec["max_seq_len"], "steps": spec["steps"], "micro_batch_size": 8, "lr": lr, "warmup_steps": 10,
           "seed": 0, "num_virtual_tokens": block["num_virtual_tokens"], "init_text": block.get("init_text"),
           "out_dir": str(OUT / name)}
    (OUT / name).mkdir(parents=True, exist_ok=True)
    (OUT / name / "config.json").write_text(json.dumps(cfg))
    print(f"[{name}] training (HF peft + Trainer)", flush=True)
    train = run_measured([sys.executable, str(ROOT / "bench" / "hf_reference.py"), str(OUT / name / "config.json")],
                         OUT / f"{name}.train.log")
    ref = json.loads((OUT / name / "reference.json").read_text())
    log = OUT / f"{name}.eval.json"
    print(f"[{name}] scoring", flush=True)
    run_measured([sys.executable, "-m", "peftcli.cli", "eval", str(OUT / name / "adapter"), "--data", files["eval"],
                  "--format", spec["format"], "--json", "--no-base", *eval_args(task)], log)
    row = {"task": task, "method": f"{method} (HF peft + Trainer)", "trainable_params": ref["trainable_params"],
           "train_s": ref["train_s"], "process_s": train["wall_s"], "peak_rss_gib": train["peak_rss_gib"],
           "steps": ref["steps"], "examples": ref["steps"] * 8, "tokens_seen": None,
           "adapted": json.loads(log.read_text().strip().splitlines()[-1])["adapted"]}
    (OUT / f"{name}.json").write_text(json.dumps(row, indent=1))
    return row


def tables(rows: list[dict], bases: dict) -> str:
    """docs/results.md's tables from the measured rows and the base model's scores per task."""
    lines = []
    for task in TASKS:
        got = [r for r in rows if r["task"] == task]
        if not got:
            continue
        base = bases[task]
        if task == "sst2":
            c = base["classification"]
            lines += ["## SST-2 (872 validation rows)", "",
                      "| method | trainable params | accuracy (label likelihood) | accuracy (greedy answer) | tokens seen | "
                      "training time | peak RSS |",
                      "|---|---:|---:|---:|---:|---:|---:|",
                      f"| base (zero-shot) | 0 | {c['label_accuracy']:.1%} | {c['generation_accuracy']:.1%} | — | — | — |"]
            for r in got:
                c = r["adapted"]["classification"]
                lines.append(f"| {r['method']} | {r['trainable_params']:,} | {c['label_accuracy']:.1%} | "
                             f"{c['generation_accuracy']:.1%} | {_count(r['tokens_seen'])} | {r['train_s']:.0f} s | "
                             f"{_gib(r['peak_rss_gib'])} |")
        else:
            lines += ["## Alpaca (first 300 held-out rows)", "",
                      "| method | trainable params | held-out loss | perplexity | tokens seen | training time | peak RSS |",
                      "|---|---:|---:|---:|---:|---:|---:|",
                      f"| base (zero-shot) | 0 | {base['loss']:.4f} | {base['perplexity']:.2f} | — | — | — |"]
            for r in got:
                a = r["adapted"]
                lines.append(f"| {r['method']} | {r['trainable_params']:,} | {a['loss']:.4f} | {a['perplexity']:.2f} | "
                             f"{_count(r['tokens_seen'])} | {r['train_s']:.0f} s | {_gib(r['peak_rss_gib'])} |")
        lines.append("")
    return "\n".join(lines)


def _count(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def _gib(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(METHODS), help="methods to (re)measure (none: only the --reference runs)")
    ap.add_argument("--tasks", nargs="*", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--missing", action="store_true", help="measure only the rows not measured yet")
    ap.add_argument("--steps", type=int, help="optimizer steps for every task (a quick trial; the tables use the defaults)")
    ap.add_argument("--reference", nargs="*", choices=["prompt_tuning", "p_tuning"],
                    help="also train these methods with HF peft + Trainer in the same setting (SST-2), and ours in "
                    "HF's precision (float32 base), as a check of ours (default: prompt_tuning, none with --only)")
    args = ap.parse_args()
    if not (SHARED / "sst2" / "train.jsonl").is_file() or not (SHARED / "alpaca" / "train.jsonl").is_file():
        print(f"results: skipped: {SHARED}/sst2 and {SHARED}/alpaca are needed (set PEFTCLI_SHARED_DATA)")
        return
    if args.steps:
        for spec in TASKS.values():
            spec["steps"] = args.steps
    files = prepare()
    references = args.reference if args.reference is not None else ["prompt_tuning"] if args.only is None else []
    rows, bases = [], {}
    for task in args.tasks:
        bases[task] = base_scores(task, files[task])
        for method in METHODS:
            row_file = OUT / f"{task}-{method}.json"
            wanted = method in args.only if args.only is not None else not (args.missing and row_file.exists())
            if wanted:
                measure(task, method, files[task])
            if row_file.exists():
                rows.append(json.loads(row_file.read_text()))
            checks = [(f"{task}-{method}-float32.json", measure, ("float32",)),  # ours in HF's precision
                      (f"{task}-{method}-hf-peft.json", reference, ())]  # HF peft + Trainer
            for file, run, extra in checks:
                check_file = OUT / file
                if task == "sst2" and method in references and not (args.missing and check_file.exists()):
                    run(task, method, files[task], *extra)
                if check_file.exists():
                    rows.append(json.loads(check_file.read_text()))
    text = tables(rows, bases)
    print(text)
    (ROOT / "bench" / "results-methods.json").write_text(json.dumps({"base": bases, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
