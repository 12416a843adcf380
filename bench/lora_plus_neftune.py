"""LoRA+ (``method.lr_ratio``) and NEFTune (``train.neftune_alpha``) on the bundled task: steps to a target held-out loss.

Trains the demo recipe (``peftcli/recipes/demo.yaml``: LoRA r=16 on every linear layer of the
embedded SmolLM2-135M, 40 steps of 8 rows of ``peftcli/recipes/data/quick/``, lr 2e-3, cosine)
with an in-run eval every ``--eval-every`` steps (the first 50 held-out rows), once per variant,
the same seed and data:

    peft train peftcli/recipes/demo.yaml --output-dir runs/plus/<variant> --set train.eval_every=5 [--set ...]
    peft eval runs/plus/<variant> --json --no-base        (the 100 held-out rows: loss, exact match)

The target loss is the baseline's final in-run eval loss × (1 + ``--margin``) unless ``--target``
is given; each variant's row is the first step whose in-run eval loss is at or below it.
Steps, not seconds, are what this compares (timings on a shared CPU are not); run with
``OMP_NUM_THREADS=1`` on a busy machine so the runs do not fight over cores.

Usage: OMP_NUM_THREADS=1 python bench/lora_plus_neftune.py [--only NAME ...] [--target LOSS] [--table] [--doc]
Writes bench/lora_plus_neftune.json and prints the markdown table (docs/methods.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from measure import replace_marked_block, run_measured

ROOT = Path(__file__).resolve().parent.parent
PEFT = [sys.executable, "-m", "peftcli.cli"]
RECIPE = "peftcli/recipes/demo.yaml"

VARIANTS = {  # name -> extra --set overrides
    "baseline": [],
    "lora+ (lr_ratio 16)": ["method.lr_ratio=16"],
    "neftune (alpha 5)": ["train.neftune_alpha=5"],
    "lora+ and neftune": ["method.lr_ratio=16", "train.neftune_alpha=5"],
    "lora+ (lr_ratio 16, lr 5e-4)": ["method.lr_ratio=16", "train.lr=5e-4"],  # B at 8e-3, A a quarter of the demo's
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def train_and_score(name: str, sets: list[str], eval_every: int, out: Path) -> dict:
    """One variant: its in-run eval curve, final held-out loss and exact match (peft eval)."""
    run_dir = out / slug(name)
    cmd = [*PEFT, "train", RECIPE, "--output-dir", str(run_dir), "--overwrite",
           "--set", f"train.eval_every={eval_every}", "--set", "train.save_every=0"]
    for item in sets:
        cmd += ["--set", item]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    try:
        m = run_measured(cmd, out / f"{slug(name)}.train.log")
    except SystemExit as failed:  # e.g. a non-finite loss: the row says so, the others still run
        print(failed, flush=True)
        return {"name": name, "sets": sets, "curve": _curve(run_dir), "failed": str(failed).splitlines()[0],
                "heldout_rows": None, "heldout_loss": None, "exact_match": None, "train_wall_s": None}
    curve = _curve(run_dir)
    eval_log = out / f"{slug(name)}.eval.json"
    run_measured([*PEFT, "eval", str(run_dir), "--json", "--no-base"], eval_log)
    scores = json.loads(eval_log.read_text().strip().splitlines()[-1])
    row = {"name": name, "sets": sets, "curve": curve, "heldout_rows": scores["rows"],
           "heldout_loss": scores["adapted"]["loss"], "exact_match": scores["adapted"]["exact_match"],
           "train_wall_s": m["wall_s"]}
    print(f"[{name}] eval curve {curve}; held-out loss {row['heldout_loss']:.4f}, EM {row['exact_match']:.1%}", flush=True)
    return row


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, in-run eval loss) of every eval event in the run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [(e["step"], e["eval_loss"]) for e in events if e.get("event") == "eval"]


def first_step_at(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first step whose eval loss is <= target (None: never)."""
    return next((step for step, loss in curve if loss <= target), None)


def table(rows: list[dict], target: float, early: float = 0.7) -> str:
    lines = [f"| variant | steps to eval loss ≤ {early:.2f} | steps to eval loss ≤ {target:.4f} | in-run eval loss at "
             "10 / 20 / 40 | held-out loss (100 rows) | exact match |", "|---|---:|---:|---|---:|---:|"]
    for r in rows:
        at = dict(r["curve"])
        step = " | ".join(str(first_step_at(r["curve"], t) or "not reached") for t in (early, target))
        marks = " / ".join(f"{at[s]:.4f}" if s in at else "-" for s in (10, 20, 40))
        if r.get("failed"):
            lines.append(f"| {r['name']} | {step} | {marks} | "
                         f"failed: {r['failed']} | - |")
            continue
        lines.append(f"| {r['name']} | {step} | {marks} | "
                     f"{r['heldout_loss']:.4f} | {r['exact_match']:.1%} |")
    return "\n".join(lines)


DOC = ROOT / "docs" / "methods.md"
BEGIN, END = "<!-- plus:begin -->", "<!-- plus:end -->"


def write_doc(rows: list[dict], meta: dict) -> None:
    """Replace the block between the plus markers of docs/methods.md with the table."""
    replace_marked_block(DOC, BEGIN, END, (
        f"_Measured {meta['date']} at commit {meta['commit']} on {meta['machine']} with "
        f"`OMP_NUM_THREADS=1 python bench/lora_plus_neftune.py`: the demo recipe (LoRA r=16, all-linear, 40 steps of 8 "
        f"rows, lr 2e-3 cosine, warmup 4, seed 0), in-run eval every {meta['eval_every']} steps on the first 50 "
        f"held-out rows; target: {meta['target_rule']}._\n\n{table(rows, meta['target'], meta['early'])}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="variants to (re)measure; the others are read from earlier runs")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--target", type=float, help="target in-run eval loss (default: baseline final × (1 + margin))")
    ap.add_argument("--margin", type=float, default=0.05)
    ap.add_argument("--early", type=float, default=0.7, help="a second, early target eval loss (default 0.7)")
    ap.add_argument("--out", default="runs/plus")
    ap.add_argument("--machine", default=None, help="how the table names the machine (default: platform.processor())")
    ap.add_argument("--doc", action="store_true", help="write the table into docs/methods.md")
    ap.add_argument("--table", action="store_true", help="train nothing: the table from the rows measured before")
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, sets in VARIANTS.items():
        row_file = out / f"{slug(name)}.row.json"
        if not args.table and (not args.only or name in args.only):
            row_file.write_text(json.dumps(train_and_score(name, sets, args.eval_every, out), indent=1))
        if row_file.exists():
            rows.append(json.loads(row_file.read_text()))
    base = next(r for r in rows if r["name"] == "baseline")
    target = args.target if args.target is not None else round(base["curve"][-1][1] * (1 + args.margin), 4)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": args.machine or platform.processor() or platform.machine(),
            "target": target, "early": args.early, "eval_every": args.eval_every,
            "target_rule": (f"{target} (given)" if args.target is not None
                            else f"the baseline's final in-run eval loss + {args.margin:.0%}")}
    (ROOT / "bench" / "lora_plus_neftune.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"target {target:.4f} (commit {commit})")
    print(table(rows, target, args.early))
    if args.doc:
        write_doc(rows, meta)


if __name__ == "__main__":
    main()
