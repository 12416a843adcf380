"""Method comparison: every bundled recipe trained for the same steps on the bundled task, then scored.

Runs, one after another so the timings do not share the CPU:

    peft train peftcli/recipes/<name>.yaml --output-dir runs/compare/<name>
    peft eval  runs/compare/<name> --json

and writes ``bench/methods.json`` and the table between the markers in ``docs/methods.md``.
Every bundled recipe trains 150 optimizer steps of 8 examples (1,200 examples, 0.6 epoch of the
2,000 training rows); the bottleneck adapter is run twice, as houlsby and as pfeiffer.

Usage: python bench/methods.py [--only LABEL ...] [--steps N]
(each row is kept in runs/compare/<label>.row.json, so ``--only`` re-measures some rows and the
table is rebuilt from all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from measure import replace_marked_block, run_measured

ROOT = Path(__file__).resolve().parent.parent
PEFT = [sys.executable, "-m", "peftcli.cli"]
DOC = ROOT / "docs" / "methods.md"
BEGIN, END = "<!-- comparison:begin -->", "<!-- comparison:end -->"

# (row label, recipe, extra --set overrides)
RUNS = [
    ("lora", "lora-llama", []),
    ("qlora", "qlora-llama", []),
    ("lora + dora", "dora-llama", []),
    ("adapter (houlsby)", "adapter-llama", []),
    ("adapter (pfeiffer)", "adapter-llama", ["method.variant=pfeiffer"]),
    ("ia3", "ia3-llama", []),
    ("prompt_tuning", "prompt-tuning-llama", []),
    ("p_tuning", "p-tuning-llama", []),
    ("prefix_tuning", "prefix-tuning-llama", []),
]


def measure(label: str, recipe: str, sets: list[str], steps: int | None, out_root: Path) -> dict:
    """Train and evaluate one recipe; returns one row of the comparison."""
    slug = _slug(label)
    run_dir = out_root / slug
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    overrides = [*sets, *([f"train.max_steps={steps}"] if steps else [])]
    train_cmd = [*PEFT, "train", f"peftcli/recipes/{recipe}.yaml", "--output-dir", str(run_dir)]
    for item in overrides:
        train_cmd += ["--set", item]
    print(f"[{label}] training: {' '.join(train_cmd[2:])}", flush=True)
    m = run_measured(train_cmd, out_root / f"{slug}.train.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    eval_log = out_root / f"{slug}.eval.json"
    run_measured([*PEFT, "eval", str(run_dir), "--json"], eval_log)
    scores = json.loads(eval_log.read_text().strip().splitlines()[-1])
    row = {
        "label": label, "recipe": recipe, "overrides": overrides,
        "trainable_params": summary["trainable_params"], "trainable_pct_of_base": summary["trainable_pct_of_base"],
        "steps": summary["steps"], "examples_per_step": summary.get("examples_per_step"),
        "train_s": summary["wall_s"], "process_wall_s": m["wall_s"], "process_cpu_s": m["cpu_s"], "peak_rss_gib": m["peak_rss_gib"],
        "mixed_precision": summary["mixed_precision"], "rows": scores["rows"],
        "base": scores["base"], "adapted": scores["adapted"],
    }
    print(f"[{label}] {row['trainable_params']:,} params, {row['train_s']:.0f} s, "
          f"loss {row['base']['loss']:.4f} -> {row['adapted']['loss']:.4f}, "
          f"EM {row['base']['exact_match']:.1%} -> {row['adapted']['exact_match']:.1%}", flush=True)
    return row


def table(rows: list[dict], meta: dict) -> str:
    """The markdown table of ``rows`` (one per method)."""
    base = rows[0]["base"]
    lines = [
        f"Held-out: the {rows[0]['rows']} rows of `peftcli/recipes/data/tasks/heldout.jsonl`. Base: the float32 model scores "
        f"loss {base['loss']:.4f} per supervised token, exact match {base['exact_match']:.1%}; the qlora row's base is "
        "the same model in NF4. Training time: the `peft train` loop (steps, in-run evals, checkpoints, save); "
        "CPU time (user + system) and peak RSS: the whole `peft train` process.",
        "",
        "| method | trainable params | % of base | held-out loss (base → adapted) | exact match (base → adapted) "
        "| training time | CPU time | peak RSS |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {r['trainable_pct_of_base']:.3f} | "
            f"{r['base']['loss']:.4f} → **{r['adapted']['loss']:.4f}** | "
            f"{r['base']['exact_match']:.1%} → **{r['adapted']['exact_match']:.1%}** | {r['train_s']:.0f} s | "
            f"{r['process_cpu_s']:.0f} s | {r['peak_rss_gib']:.2f} GiB |"
        )
    return "\n".join(lines)


def write_doc(rows: list[dict], meta: dict) -> None:
    """Replace the comparison block of docs/methods.md with the measured table."""
    replace_marked_block(DOC, BEGIN, END, (
        f"_Measured {meta['date']} on {meta['machine']} with `python bench/methods.py`; "
        f"{meta['steps']} steps of {meta['examples_per_step']} examples each, the recipes' own learning rates "
        f"and `mixed_precision: auto` ({meta['mixed_precision']})._\n\n{table(rows, meta)}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="row labels to (re)measure; the others are read from earlier runs")
    ap.add_argument("--steps", type=int, help="override train.max_steps for every recipe")
    ap.add_argument("--out", default="runs/compare", help="where run dirs, logs and row files go")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/methods.md")
    args = ap.parse_args()
    out_root = (ROOT / args.out).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, recipe, sets in RUNS:
        row_file = out_root / f"{_slug(label)}.row.json"
        if not args.only or label in args.only:
            row_file.write_text(json.dumps(measure(label, recipe, sets, args.steps, out_root), indent=1))
        if row_file.exists():
            rows.append(json.loads(row_file.read_text()))
    steps = {r["steps"] for r in rows}
    if len(steps) != 1:
        raise SystemExit(f"rows trained for different step counts {sorted(steps)}; rerun them all")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
            "steps": rows[0]["steps"], "examples_per_step": rows[0]["examples_per_step"] or 8,
            "mixed_precision": rows[0]["mixed_precision"]}
    (ROOT / "bench" / "methods.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(table(rows, meta))
    if not args.no_doc and len(rows) == len(RUNS):
        write_doc(rows, meta)
        print(f"updated {DOC.relative_to(ROOT)}")


def _slug(label: str) -> str:
    return label.replace(" ", "").replace("(", "-").replace(")", "").replace("+", "-")


if __name__ == "__main__":
    main()
