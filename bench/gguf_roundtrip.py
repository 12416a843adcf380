"""The round trip of ``peft export --gguf``, measured: for a run, each dtype's file read back by
transformers' GGUF reader against the merged model (float32), on the run's held-out rows.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/gguf_roundtrip.py RUN [--rows 16] [--dir DIR]

prints one markdown table row per dtype: file size, max |Δlogit|, mean |Δlogit|, max |logit| of the
merged model, and how often the top-1 token agrees, over every position of the first ``--rows``
held-out rows (prompt + answer, each row alone, no padding). The files go to ``--dir`` (default a
temporary dir, removed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from peftcli import artifacts, export, merge, models


def held_out_texts(run: Path, rows: int) -> list[str]:
    """The first ``rows`` rows of the run's eval file, each as one text (every string field joined)."""
    recipe = artifacts.read_adapter(run).recipe
    source = recipe.data.eval[0] if isinstance(recipe.data.eval, list) else recipe.data.eval
    lines = Path(source.path).read_text(encoding="utf-8").splitlines()[:rows]
    return ["".join(v for v in json.loads(line).values() if isinstance(v, str)) for line in lines]


@torch.no_grad()
def compare(model, reference: list[torch.Tensor], ids: list[torch.Tensor]) -> dict:
    diffs, agree, total = [], 0, 0
    for x, ref in zip(ids, reference):
        out = model(input_ids=x).logits.float()[0]
        diffs.append((out - ref).abs())
        agree += (out.argmax(-1) == ref.argmax(-1)).sum().item()
        total += ref.shape[0]
    flat = torch.cat([d.reshape(-1) for d in diffs])
    return {"max": flat.max().item(), "mean": flat.mean().item(), "top1": agree / total}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)

    merged = merge.merge_in_memory(args.run, "float32")
    ids = [torch.tensor([merged.tokenizer(t)["input_ids"]]) for t in held_out_texts(args.run, args.rows)]
    with torch.no_grad():
        reference = [merged.model(input_ids=x).logits.float()[0] for x in ids]
    peak = max(r.abs().max().item() for r in reference)
    print(f"{sum(x.shape[1] for x in ids)} positions of {len(ids)} held-out rows of {args.run}; max |logit| {peak:.2f}")
    print("| dtype | file | max abs logit diff | mean abs logit diff | top-1 agrees |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        where = args.dir or Path(tmp)
        for dtype in export.GGUF_DTYPES:
            path = export.export_gguf(args.run, where / f"model-{dtype}.gguf", dtype, overwrite=True,
                                      log=lambda line: print(line, file=sys.stderr))
            with models.gguf_read_once():
                back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
            m = compare(back, reference, ids)
            print(f"| {dtype} | {path.stat().st_size / 2**20:.0f} MiB | {m['max']:.2e} | {m['mean']:.2e} | "
                  f"{100 * m['top1']:.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
