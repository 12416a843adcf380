"""The speed-up of ``data.packing: true``: the same alpaca examples, one epoch, trained unpacked
(padding-free micro-batches of ``micro_batch_size`` examples, the default) and packed
(micro-batches of ``micro_batch_size`` rows of up to ``max_seq_len`` tokens), optionally also
on right-padded rows; each ``peft train`` in its own process, the rest of the recipe the
benchmark's (bench/run.py: the embedded SmolLM2-135M, LoRA r 16 on all linear layers, bf16
base weights, completion rows of the alpaca template).

Speed is real (unpadded) tokens per second of the training loop (``tokens_seen`` over the last
train event's ``elapsed_s``) and the loop's milliseconds per example. A packed epoch takes
fewer, larger steps (more examples per step): the loss each step optimises is still the mean
over its supervised tokens.

Data: the first ``--rows`` rows of ``../shared/data/alpaca/train.jsonl``; without that file the
script says so and exits 0 (nothing is measured on other data). Prints a markdown table and the
one-line row for docs/benchmarks.md; writes ``runs/bench/packing/results.json``.
Usage: python bench/packing.py [--rows N] [--max-seq-len T] [--micro-batch-size B] [--padded] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import yaml
from measure import run_measured
from run import HPARAMS, OUT, SHARED_ALPACA, git_commit, our_recipe, prepare_data

VARIANTS = {  # name -> data keys
    "padded": {"padding_free": False, "packing": False},
    "unpacked": {"padding_free": True, "packing": False},
    "packed": {"padding_free": True, "packing": True},
}


def recipe_for(variant: str, train: str, hp: dict, model: str) -> tuple[str, object]:
    """``runs/bench/packing-<variant>/recipe.yaml``: bench/run.py's recipe with the variant's data keys."""
    path = our_recipe(f"packing-{variant}", train, "completion", "none", hp)
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["name_or_path"] = model
    recipe["data"].update(VARIANTS[variant])
    recipe["train"]["log_every"] = 1_000_000  # one train event, at the last step
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path), path.parent / "ours"


def measure(variant: str, train: str, hp: dict, model: str) -> dict:
    recipe, run_dir = recipe_for(variant, train, hp, model)
    print(f"[packing] {variant}: peft train {recipe}", flush=True)
    m = run_measured([sys.executable, "-m", "peftcli.cli", "train", recipe, "--overwrite"], run_dir.parent / "train.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_s = [e for e in events if e.get("event") == "train"][-1]["elapsed_s"]
    n = summary["train_examples"]
    return {"variant": variant, "examples": n, "steps": summary["steps"], "packing": summary.get("packing"),
            "train_s": train_s, "wall_s": m["wall_s"], "peak_rss_gib": m["peak_rss_gib"], "tokens": summary["tokens_seen"],
            "tokens_per_s": summary["tokens_seen"] / train_s, "ms_per_example": 1000 * train_s / n,
            "final_train_loss": summary["final_train_loss"], "device": summary["device"]}


def table(results: list[dict], hp: dict) -> str:
    base = next(r for r in results if r["variant"] == "unpacked")
    lines = ["| variant | examples | steps | rows (fill) | train loop | tokens/s | ms per example | speed-up (tokens/s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        p = r["packing"]
        rows = f"{p['rows']} ({p['fill_pct']:.1f}%)" if p else "—"
        lines.append(f"| {r['variant']} | {r['examples']} | {r['steps']} | {rows} | {r['train_s']:.1f} s | {r['tokens_per_s']:.0f} | "
                     f"{r['ms_per_example']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}× |")
    packed = next(r for r in results if r["variant"] == "packed")
    lines += ["", "| date | device | data | max_seq_len | micro-batch | unpacked tok/s | packed tok/s | fill | speed-up |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|",
              f"| {time.strftime('%Y-%m-%d')} | {packed['device']} | alpaca, {packed['examples']} examples | {hp['max_seq_len']} | "
              f"{hp['micro_batch_size']} | {base['tokens_per_s']:.0f} | {packed['tokens_per_s']:.0f} | "
              f"{packed['packing']['fill_pct']:.1f}% | **{packed['tokens_per_s'] / base['tokens_per_s']:.2f}×** |"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512, help="alpaca rows trained (one epoch)")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=HPARAMS["micro_batch_size"])
    ap.add_argument("--padded", action="store_true", help="also train on right-padded rows")
    ap.add_argument("--model", default="smollm2-135m", help="the base (default: the embedded model)")
    args = ap.parse_args()
    if not (SHARED_ALPACA / "train.jsonl").is_file():
        print(f"bench/packing.py: skipped: no alpaca data at {SHARED_ALPACA / 'train.jsonl'} (set PEFTCLI_SHARED_DATA)")
        return
    from peftcli import models

    models.resolve(args.model)  # converts the embedded model once, before any timing
    hp = {**HPARAMS, "max_seq_len": args.max_seq_len, "micro_batch_size": args.micro_batch_size}
    d = prepare_data(args.rows)
    results = [measure(v, d["train"], hp, args.model) for v in (["padded"] if args.padded else []) + ["unpacked", "packed"]]
    out = OUT / "packing"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"commit": git_commit(), "hparams": hp, "results": results}, indent=1) + "\n")
    print(table(results, hp))


if __name__ == "__main__":
    main()
