"""Peak resident memory per process: one process, DDP on 2 processes, FSDP on 2 processes.

The embedded SmolLM2-135M (float32, no autocast, so every case computes the same numbers), LoRA
r 16 on every linear layer (and QLoRA, NF4, with DDP and FSDP), the bundled task data, a few
optimizer steps of ``--micro-batch-size`` (default 4) examples of up to 256 tokens per process.
Each case is one ``peft train`` (CPU processes, gloo); every process records its own peak RSS (``getrusage`` ``ru_maxrss``) in
``summary.json``'s ``peak_rss_gib`` (and ``rss_gib``, resident after the steps), in process
order. Prints a markdown table.

    OMP_NUM_THREADS=1 python bench/distributed.py [--steps 4] [--micro-batch-size 4] [--out runs/bench/distributed]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
FSDP = ["--set", "train.distributed=fsdp"]
QLORA = ["--set", "method.name=qlora"]
CASES = {
    "LoRA, 1 process": [],
    "LoRA, DDP, 2 processes": ["--num-processes", "2"],
    "LoRA, FSDP, 2 processes": ["--num-processes", "2", *FSDP],
    "QLoRA, DDP, 2 processes": ["--num-processes", "2", *QLORA],
    "QLoRA, FSDP, 2 processes": ["--num-processes", "2", *FSDP, *QLORA],
}


def recipe(steps: int, out: Path, micro_batch_size: int = 4) -> Path:
    """The bench recipe, written to ``out/recipe.yaml``."""
    r = {
        "model": {"name_or_path": "smollm2-135m", "dtype": "float32"},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": {"path": str(ROOT / "peftcli/recipes/data/tasks/train.jsonl"), "format": "alpaca"},
                 "max_seq_len": 256},
        "train": {"max_steps": steps, "micro_batch_size": micro_batch_size, "lr": 1e-3, "mixed_precision": "no", "eval_every": 0,
                  "save_every": 0, "log_every": 1},
        "output": {"dir": str(out / "run")},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def run_case(name: str, flags: list[str], recipe_path: Path, out: Path) -> dict:
    """One ``peft train`` of the case; its summary's per-process peak RSS and the wall time."""
    run_dir = out / name.replace(",", "").replace(" ", "-").lower()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "peftcli.cli", "train", str(recipe_path), "--output-dir", str(run_dir),
                           "--overwrite", *flags], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"case": name, "peak_rss_gib": summary["peak_rss_gib"], "rss_gib": summary["rss_gib"], "wall_s": wall,
            "steps": summary["steps"]}


def table(rows: list[dict]) -> str:
    lines = ["| case | peak RSS per process (GiB) | RSS after the steps, per process (GiB) | wall (s) |",
             "|---|---|---|---|"]
    for r in rows:
        peak, now = (", ".join(f"{x:.2f}" for x in r[key]) for key in ("peak_rss_gib", "rss_gib"))
        lines.append(f"| {r['case']} | {peak} | {now} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=4, help="examples per process per step")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench/distributed")
    args = ap.parse_args()
    path = recipe(args.steps, args.out, args.micro_batch_size)
    rows = [run_case(name, flags, path, args.out) for name, flags in CASES.items()]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, {args.steps} steps of "
          f"{args.micro_batch_size} examples per process, {os.cpu_count()} cores\n")
    print(table(rows))


if __name__ == "__main__":
    main()
