"""Checks on a CUDA machine, two entries.

``python bench/gpu_check.py OUT_DIR [METHOD ...]`` — every method trains, evaluates, generates
(and merges) on the GPU, and a QLoRA adapter trained there is read the same by HF peft +
bitsandbytes. First the training step's own kernels (LoRA branch, per-example attention,
block-wise head cross-entropy) against their plain formulas on the GPU. Uses a tiny random Llama
(tests/tiny.py), so it needs no model download and runs in about a minute. Each line of the report
is ``ok`` or ``FAIL`` with the measured values; exit 1 on any FAIL.

``python bench/gpu_check.py OUT_DIR --bench`` — ``make bench``'s workloads A (LoRA) and B (QLoRA,
NF4 base) on CUDA, peftcli against HF peft + Trainer in one run: bench/run.py's definitions (the
embedded SmolLM2-135M, its recipe and the peer's, 160 train rows for one epoch of 40 steps of 4
examples, max_seq_len 256, r 16) with the device the only change — ours picks CUDA by itself
(accelerate), the peer gets ``device: cuda`` (bf16 autocast where the GPU has it, NF4 computing in
bf16). Each tool trains in its own process. Per workload and tool: the process's wall time, the
train loop's seconds and supervised tokens/s, the peak GPU memory (``torch.cuda.max_memory_allocated``
recorded by each process: ours in summary.json ``cuda_peak_memory_gib``, the peer in its
peer.json), the peak RSS, and the held-out loss of 100 rows by bench/score.py (the one evaluator,
HF peft, on the GPU); then the ratios peftcli / peer. Expected: about 3-4 minutes on one GPU (10
processes of 10-30 s, mostly start-up and loading; the embedded model's first conversion adds
about half a minute). ``--device cpu --tiny`` runs the same flow on the CPU with 8 train rows and
16 held-out rows (a dry run of everything but CUDA, a few minutes on 2 cores). A run that did not
train on the device asked for is a FAIL (exit 1), not a ratio.

``python bench/gpu_check.py OUT_DIR --fsdp`` — needs 2 or more GPUs: ``train.distributed: fsdp``
on CUDA (NCCL), for LoRA and QLoRA (NF4) on the embedded SmolLM2-135M (bf16 autocast, 6 steps of 4
examples of up to 256 tokens per process): one GPU with ``grad_accum: 2``, DDP on 2 GPUs and FSDP
on 2 GPUs, each one ``peft train``. Measures each process's peak GPU memory
(``torch.cuda.max_memory_allocated``, summary.json ``cuda_peak_memory_gib_per_process``) and peak
RSS, and checks that FSDP's per-step losses equal one GPU's with double accumulation (bf16
tolerance, 2e-2 nats) and that FSDP's memory per GPU is below DDP's. A recipe peft refuses (QLoRA
under FSDP is refused on the CPU, where bitsandbytes' quantisation state did not survive sharding)
is reported as a FAIL line with the refusal. About 2 minutes.

CI has no GPU, so this is run by hand where one is lent.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.tiny import SORT_ROWS, save_tiny  # noqa: E402

METHODS = {
    "lora": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
    "qlora": {"name": "qlora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
    "dora": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "dora": True},
    "adapter": {"name": "adapter", "variant": "houlsby"},
    "ia3": {"name": "ia3"},
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 8},
    "p_tuning": {"name": "p_tuning", "num_virtual_tokens": 8},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 5},
}
FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def peft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftcli.cli", *args], capture_output=True, text=True, cwd=ROOT)


def main(out: Path, only: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    check("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")
    if torch.cuda.is_available():
        training_path("cuda")
    model_dir = save_tiny(out / "tiny", pad="eos", head_dim=32)
    rows = out / "train.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in SORT_ROWS * 4))
    for label, method in METHODS.items():
        if only and label not in only:
            continue
        run = out / label
        recipe = {"model": {"name_or_path": str(model_dir), "quantization": "nf4" if label == "qlora" else "none"},
                  "method": method,
                  "data": {"train": {"path": str(rows), "format": "alpaca"}, "eval": {"path": str(rows), "format": "alpaca"},
                           "max_seq_len": 128},
                  "train": {"max_steps": 30, "micro_batch_size": 4, "lr": 1e-2, "log_every": 1, "eval_every": 0,
                            "save_every": 10, "mixed_precision": "auto"},
                  "output": {"dir": str(run)}}
        (out / f"{label}.yaml").write_text(yaml.safe_dump(recipe))
        done = peft("train", str(out / f"{label}.yaml"))
        if done.returncode:
            check(f"{label} train", False, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no stderr")
            continue
        summary = json.loads((run / "summary.json").read_text())
        losses = [e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
        check(f"{label} train", losses[-1] < losses[0] and summary.get("mixed_precision") == "bf16",
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, mixed_precision {summary.get('mixed_precision')}, "
              f"device {summary.get('device', '?')}")
        ev = peft("eval", str(run), "--json")
        if ev.returncode == 0:
            result = json.loads(ev.stdout)
            check(f"{label} eval", result["adapted"]["loss"] < result["base"]["loss"],
                  f"loss base {result['base']['loss']:.3f} adapted {result['adapted']['loss']:.3f}")
        else:
            check(f"{label} eval", False, ev.stderr.strip()[-300:])
        gen = peft("generate", str(run), "Sort the numbers.\n3, 1", "--max-new-tokens", "8")
        nocache = peft("generate", str(run), "Sort the numbers.\n3, 1", "--max-new-tokens", "8", "--no-cache")
        check(f"{label} generate", gen.returncode == 0 and gen.stdout == nocache.stdout,
              f"rc {gen.returncode}, cache == no-cache: {gen.stdout == nocache.stdout} {gen.stdout.strip()[:40]!r}"
              + (f" {gen.stderr.strip()[-200:]}" if gen.returncode else ""))
        if label in ("lora", "qlora", "dora", "ia3"):
            mg = peft("merge", str(run), "-o", str(out / f"{label}-merged"))
            check(f"{label} merge", mg.returncode == 0, mg.stderr.strip()[-300:] if mg.returncode else "written")
    qlora_against_hf_peft(model_dir, out / "qlora")
    if FAILED:
        raise SystemExit(f"{len(FAILED)} failed: {', '.join(FAILED)}")


FSDP_CASES = {"1 GPU, grad_accum 2": ["--set", "train.grad_accum=2"], "DDP, 2 GPUs": ["--num-processes", "2"],
              "FSDP, 2 GPUs": ["--num-processes", "2", "--set", "train.distributed=fsdp"]}


def fsdp(out: Path) -> None:
    """The ``--fsdp`` check (module docstring): a table of memory per process and the checks."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check("2 GPUs", gpus >= 2, f"{gpus} visible")
    if gpus < 2:
        raise SystemExit("--fsdp needs 2 or more GPUs")
    out.mkdir(parents=True, exist_ok=True)
    print("| method | case | peak GPU memory per process (GiB) | peak RSS per process (GiB) | final loss |\n|---|---|---|---|---|")
    for method in ("lora", "qlora"):
        recipe = {"model": {"name_or_path": "smollm2-135m"}, "method": {**METHODS[method], "r": 16, "alpha": 32},
                  "data": {"train": {"path": str(ROOT / "peftcli/recipes/data/tasks/train.jsonl"), "format": "alpaca"},
                           "max_seq_len": 256},
                  "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 1e-3, "log_every": 1, "eval_every": 0,
                            "save_every": 0, "mixed_precision": "auto", "scheduler": "constant"}}
        path = out / f"fsdp-{method}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        found = {}
        for case, flags in FSDP_CASES.items():
            run = out / f"fsdp-{method}-{case.split(',')[0].replace(' ', '-').lower()}"
            done = peft("train", str(path), "--output-dir", str(run), "--overwrite", *flags)
            if done.returncode:
                check(f"{method} {case}", False, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no stderr")
                continue
            summary = json.loads((run / "summary.json").read_text())
            losses = [e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                      if e.get("event") == "train"]
            found[case] = {"gpu": summary["cuda_peak_memory_gib_per_process"], "losses": losses}
            print(f"| {method} | {case} | {', '.join(f'{x:.2f}' for x in summary['cuda_peak_memory_gib_per_process'])} | "
                  f"{', '.join(f'{x:.2f}' for x in summary['peak_rss_gib'])} | {losses[-1]:.4f} |", flush=True)
        one, ddp, sharded = (found.get(case) for case in FSDP_CASES)
        if one and sharded:
            diff = max(abs(a - b) for a, b in zip(one["losses"], sharded["losses"]))
            check(f"{method} fsdp losses", diff < 2e-2, f"max |FSDP - 1 GPU accum 2| = {diff:.1e} nats over 6 steps")
        if ddp and sharded:
            check(f"{method} fsdp memory", max(sharded["gpu"]) < min(ddp["gpu"]),
                  f"peak per GPU: FSDP {max(sharded['gpu']):.3f} GiB, DDP {min(ddp['gpu']):.3f} GiB")
    if FAILED:
        raise SystemExit(f"{len(FAILED)} failed: {', '.join(FAILED)}")


def training_path(device: str) -> None:
    """The training step's own kernels on the GPU against their plain formulas on the same device:
    the LoRA branch (dropout positions drawn as geometric gaps, hand-written backward), per-example attention
    (bf16) against transformers' block-diagonal mask, and the block-wise head cross-entropy."""
    import torch.nn.functional as F

    from peftcli import data
    from peftcli.loss import head_cross_entropy, prepare_padding_free, supervised_loss_sum
    from peftcli.methods import lora_kernel
    from tests.tiny import tiny_llama

    x = torch.randn(3, 40, 64, device=device, requires_grad=True)
    a, b = torch.randn(8, 64, device=device, requires_grad=True), torch.randn(32, 8, device=device, requires_grad=True)
    keep = lora_kernel.keep_mask(x.shape, 0.1, 77, torch.device(device))
    y = lora_kernel.LoRABranch.apply(x, a, b, 2.0, 0.1, 77, torch.float32)
    scale = 1 / (1 - 0.1)
    ref = 2.0 * (torch.where(keep, x * scale, 0) @ a.T) @ b.T
    grads = torch.autograd.grad(y.square().sum(), (x, a, b))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, a, b))
    diff = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, ref_grads))  # relative to the largest
    rate = 1 - keep.float().mean().item()  # 7,680 draws: one standard deviation is 0.0034
    check("lora branch (cuda)", float((y - ref).abs().max() / ref.abs().max()) < 1e-5 and diff < 1e-5 and abs(rate - 0.1) < 0.015,
          f"max grad diff {diff:.1e} of the largest, dropped {rate:.3f}")

    model = tiny_llama(attn_implementation="sdpa").to(device, torch.bfloat16)
    examples = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (9, 17, 4)]
    free = {k: v.to(device) for k, v in data.collate_padding_free(examples).items()}
    with torch.no_grad():
        masked = supervised_loss_sum(model, free)[0].item()
        switched = prepare_padding_free(model)
        per_example = supervised_loss_sum(model, free)[0].item()
    check("per-example attention (cuda, bf16)", switched and abs(per_example - masked) < 1e-2 * abs(masked),
          f"loss {per_example:.4f} vs block mask {masked:.4f}")

    head = torch.nn.Linear(64, 5000, bias=False, device=device).requires_grad_(False)
    h = torch.randn(700, 64, device=device, requires_grad=True)
    t = torch.randint(0, 5000, (700,), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = head_cross_entropy(head, h, t)
        (gh,) = torch.autograd.grad(loss, h)
        ref = F.cross_entropy(head(h).float(), t, reduction="sum")
        (rh,) = torch.autograd.grad(ref, h)
    rel = float((gh - rh).abs().max() / rh.abs().max())
    check("head cross-entropy in blocks (cuda, bf16)", abs(loss.item() - ref.item()) < 1e-3 * ref.item() and rel < 2e-2,
          f"loss {loss.item():.3f} vs {ref.item():.3f}, grad rel diff {rel:.1e}")


def qlora_against_hf_peft(model_dir: Path, run: Path) -> None:
    """Our QLoRA adapter (trained on the GPU) on an NF4 base: our logits vs HF peft + bitsandbytes'."""
    if not (run / "adapter").is_dir():
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftcli import artifacts, models

    ours = artifacts.load_adapted(run).model
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    ids = torch.tensor([[1, 5, 9, 23, 40, 7, 2]], device=device)
    with torch.no_grad():
        a = ours(input_ids=ids).logits.float()
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qcfg, device_map={"": device},
                                                    dtype=torch.float32)
        models.keep_one_4bit_path(base)  # the same numeric path as ours on a CPU
        b = PeftModel.from_pretrained(base, run / "adapter").eval()(input_ids=ids).logits.float()
    diff = float((a - b).abs().max())
    check("qlora vs HF peft (cuda)", diff < 1e-3, f"max |logits diff| {diff:.2e}")


# ---------------------------------------------------------------------------------------------
# --bench: workloads A and B on the device, ours vs HF peft + Trainer


def bench(device: str, tiny: bool) -> list[dict]:
    """Workloads A and B (bench/run.py) with both tools on ``device`` ("cuda" | "cpu"); returns
    one result per workload: {"name", "rows": {tool: row}, "base_heldout_loss"}. ``tiny``: 8 train
    rows (2 steps) and 16 held-out rows. Outputs under runs/bench/gpu-A, gpu-B."""
    import run

    from peftcli import models

    hp = run.HPARAMS
    model_dir = models.resolve("smollm2-135m")  # converts the embedded GGUF once, before any timing
    d = run.prepare_data(8 if tiny else 160, 16 if tiny else 100)
    print(f"data: {d['source']}, {d['train_rows']} train rows, {d['heldout_rows']} held-out rows; device {device}", flush=True)
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None  # ours picks CUDA wherever it sees one
    results = []
    for name, quantization in (("A", "none"), ("B", "nf4")):
        label = f"gpu-{name}"
        wdir = run.OUT / label
        recipe = run.our_recipe(label, d["train"], "completion", quantization, hp)
        print(f"[{label}] peftcli: peft train {recipe.relative_to(ROOT)}", flush=True)
        ours, summary = run.train_ours(recipe, env)
        ours["peak_gpu_gib"] = summary.get("cuda_peak_memory_gib")
        on_device = summary["device"].startswith(device) and (ours["peak_gpu_gib"] is not None) == (device == "cuda")
        check(f"{label} peftcli on {device}", on_device, f"trained on {summary['device']}, mixed_precision "
              f"{summary['mixed_precision']}, {summary['steps']} steps, peak GPU memory {ours['peak_gpu_gib']}")
        print(f"[{label}] peer: HF peft + Trainer", flush=True)
        cfg = {**hp, "model_dir": model_dir, "quantization": quantization, "train": d["train"],
               "out_dir": str(wdir / "peer"), "device": device}
        peer, info = run.train_peer(cfg, wdir, env)
        peer["peak_gpu_gib"] = info.get("cuda_peak_memory_gib")
        check(f"{label} peer on {device}", (peer["peak_gpu_gib"] is not None) == (device == "cuda"),
              f"peak GPU memory {peer['peak_gpu_gib']}, {info['steps']} steps")
        rows = {"peftcli": ours, "hf-peft+Trainer": peer}
        supervised = summary["train_data"]["supervised_tokens"]  # the same rows for both tools, one epoch
        for tool, row in rows.items():
            row["supervised_tok_per_s"] = supervised / row["train_s"]
            print(f"[{label}] scoring {tool}", flush=True)
            row["heldout_loss"] = run.score(model_dir, quantization, d["heldout"], row["adapter"], wdir / f"score-{tool}.log", device)
        base = run.score(model_dir, quantization, d["heldout"], None, wdir / "score-base.log", device)
        results.append({"name": name, "rows": rows, "base_heldout_loss": base})
    return results


def ratio(ours: float | None, peer: float | None) -> str:
    """``0.42×``, or ``—`` when either side has no figure (no GPU memory off CUDA)."""
    return "—" if ours is None or peer is None or peer == 0 else f"{ours / peer:.2f}×"


def gib(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} GiB"


def bench_report(results: list[dict], device: str) -> str:
    """The markdown tables of a --bench run and the ratios peftcli / peer per workload."""
    lines = []
    for w in results:
        ours, peer = w["rows"]["peftcli"], w["rows"]["hf-peft+Trainer"]
        lines += [f"### Workload {w['name']} on {device}", "",
                  "| tool | wall (process) | train loop | supervised tok/s | peak GPU memory | peak RSS | held-out loss |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for tool, r in w["rows"].items():
            lines.append(f"| {tool} | {r['wall_s']:.1f} s | {r['train_s']:.1f} s | {r['supervised_tok_per_s']:.0f} | "
                         f"{gib(r['peak_gpu_gib'])} | {gib(r['peak_rss_gib'])} | {r['heldout_loss']:.4f} |")
        lines += ["", f"Ratios peftcli / peer: wall {ratio(ours['wall_s'], peer['wall_s'])}, train-loop supervised tok/s "
                      f"{ratio(ours['supervised_tok_per_s'], peer['supervised_tok_per_s'])}, peak GPU memory "
                      f"{ratio(ours['peak_gpu_gib'], peer['peak_gpu_gib'])}, peak RSS {ratio(ours['peak_rss_gib'], peer['peak_rss_gib'])}, "
                      f"held-out loss {100 * (ours['heldout_loss'] / peer['heldout_loss'] - 1):+.2f}% "
                      f"(untrained base {w['base_heldout_loss']:.4f}).", ""]
    return "\n".join(lines)


def machine(device: str) -> str:
    """The GPU's name and torch/CUDA versions (or the CPU's cores) for the report's heading."""
    import os
    import platform

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}"


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="where the method checks write (--bench writes under runs/bench/)")
    ap.add_argument("methods", nargs="*", help="only these method checks (default: all)")
    ap.add_argument("--bench", action="store_true", help="workloads A and B, ours vs HF peft + Trainer, instead of the checks")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="--bench's device (cpu: a dry run)")
    ap.add_argument("--tiny", action="store_true", help="--bench with 8 train rows and 16 held-out rows")
    ap.add_argument("--fsdp", action="store_true", help="train.distributed: fsdp on 2 GPUs (LoRA, QLoRA) against DDP and one GPU")
    args = ap.parse_args()
    if args.fsdp:
        fsdp(args.out)
        return
    if not args.bench:
        main(args.out, args.methods)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--bench --device cuda: no CUDA device here (use --device cpu --tiny for a dry run)")
    import time

    t0 = time.perf_counter()
    results = bench(args.device, args.tiny)
    print(f"\n## {time.strftime('%Y-%m-%d')} — {machine(args.device)}\n")
    print(bench_report(results, args.device))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps({"device": args.device, "machine": machine(args.device),
                                                      "tiny": args.tiny, "workloads": results}, indent=1) + "\n")
    print(f"{time.perf_counter() - t0:.0f} s in all; {args.out / 'bench.json'}")
    if FAILED:
        raise SystemExit(f"{len(FAILED)} failed: {', '.join(FAILED)}")


if __name__ == "__main__":
    cli()
