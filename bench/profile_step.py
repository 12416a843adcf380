"""Where one training step's time and memory go: a per-kernel profile of ``peft train``'s step.

One process builds workload A (``--workload B``: QLoRA NF4) exactly as ``peft train`` does — the
recipe of ``bench/run.py`` (:func:`run.our_recipe`), :func:`peftcli.trainer.setup` (model load,
method, the loss-path check, optimizer) — then runs the trainer's own optimizer step
(:func:`peftcli.trainer._optimizer_step`): ``--warmup`` steps, ``--steps`` timed steps without the
profiler, then ``--steps`` steps under ``torch.profiler`` (CPU). Nothing of the step is
reimplemented: its parts are only wrapped to label them.

Prints (and with ``--out`` writes as markdown):

- the resident memory after each setup phase (import, data + model load + method, loss-path
  check, optimizer) and the peak (``getrusage``), GiB;
- the step's phase split, ms per step (timed steps, no profiler): data (collate), forward (the
  decoder body), loss head (:func:`peftcli.loss.head_cross_entropy`, which computes its input
  gradient in the forward pass), backward, optimizer (clip + AdamW + zero_grad);
- the top kernels by self CPU time per step (profiled steps), with each one's share and the
  phase it ran in.

Usage: python bench/profile_step.py [--workload A|B] [--dtype auto|float32|bfloat16] [--mixed no|bf16]
       [--steps N] [--warmup W] [--top K] [--out FILE]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

PHASES = ("data", "forward", "loss head", "backward", "optimizer")


def rss_gib() -> tuple[float, float]:
    """(current, peak) resident set of this process, GiB."""
    now = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            now = int(line.split()[1]) / 2**20
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Labels:
    """Wraps callables so each call is a ``record_function`` range named after its phase and its
    wall time is added to ``self.ms[phase]`` (the time of nested phases is subtracted from the
    outer one, so the phases add up to the step)."""

    def __init__(self):
        self.ms = defaultdict(float)
        self._stack: list[float] = []

    @contextmanager
    def phase(self, name: str):
        import torch

        self._stack.append(0.0)
        t0 = time.perf_counter()
        with torch.profiler.record_function(name):
            yield
        dt = 1000 * (time.perf_counter() - t0)
        inner = self._stack.pop()
        self.ms[name] += dt - inner
        if self._stack:
            self._stack[-1] += dt

    def wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return wrapped


def build(args, say):
    """The run as ``peft train`` sets it up (trainer.setup), with the step's parts labelled."""
    import run as bench_run

    from peftcli import loss, prepare, trainer
    from peftcli.recipe import load_recipe

    d = bench_run.prepare_data(args.rows)
    name = f"profile-{args.workload}"
    path = bench_run.our_recipe(name, d["train"], "completion", "nf4" if args.workload == "B" else "none",
                                bench_run.HPARAMS)
    overrides = [f"model.dtype={args.dtype}", f"train.mixed_precision={args.mixed}", "train.log_every=1000000"]
    recipe = load_recipe(path, overrides, output_dir=str(path.parent / "ours"))
    (path.parent / "ours").mkdir(parents=True, exist_ok=True)
    rss = {"import": rss_gib()}
    load, check = prepare.load, prepare.loss_path

    def timed_load(*a, **k):
        out = load(*a, **k)
        rss["data + model + method"] = rss_gib()
        return out

    def timed_check(*a, **k):
        out = check(*a, **k)
        rss["loss-path check"] = rss_gib()
        return out

    prepare.load, prepare.loss_path = timed_load, timed_check
    t0 = time.perf_counter()
    try:
        run = trainer.setup(recipe, overwrite=True, console=_quiet_console())
    finally:
        prepare.load, prepare.loss_path = load, check
    rss["optimizer + run dir"] = rss_gib()
    say(f"setup {time.perf_counter() - t0:.1f} s; {recipe.model.dtype} base, mixed precision {recipe.train.mixed_precision}"
        f" ({run.prepared.mixed}); {run.path.describe()}")

    labels = Labels()
    run.collate = labels.wrap("data", run.collate)
    run.loss_fn.forward = labels.wrap("forward", run.loss_fn.forward)
    loss.head_cross_entropy = labels.wrap("loss head", loss.head_cross_entropy)
    acc = run.accelerator
    acc.backward = labels.wrap("backward", acc.backward)
    acc.clip_grad_norm_ = labels.wrap("optimizer", acc.clip_grad_norm_)
    run.optimizer.step = labels.wrap("optimizer", run.optimizer.step)
    run.optimizer.zero_grad = labels.wrap("optimizer", run.optimizer.zero_grad)
    return run, labels, rss


def _quiet_console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)


def phase_of(event) -> str:
    e = event
    while e is not None:
        if e.name in PHASES:
            return e.name
        e = e.cpu_parent
    return "other"


def profile(args, say=print) -> str:
    import torch
    from torch.profiler import ProfilerActivity

    from peftcli import trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    run, labels, rss = build(args, say)
    tokens = 0
    step = 0

    def one_step():
        nonlocal step, tokens
        step += 1
        before = run.counters.tokens_seen
        trainer._optimizer_step(run, step)
        tokens += run.counters.tokens_seen - before

    for _ in range(args.warmup):
        one_step()
    rss["after warm-up steps"] = rss_gib()
    labels.ms.clear()
    tokens = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        one_step()
    wall = 1000 * (time.perf_counter() - t0) / args.steps
    cpu = 1000 * (time.process_time() - c0) / args.steps
    rss_after_timed = rss_gib()
    timed_tokens = tokens / args.steps
    phase_ms = {k: v / args.steps for k, v in labels.ms.items()}

    with torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes > 0) as prof:
        for _ in range(args.steps):
            one_step()
    rss["after timed steps"] = rss_after_timed
    rss["after profiled steps (the profiler's own memory too)"] = rss_gib()

    ops = defaultdict(float)  # (name) -> self µs
    where = defaultdict(lambda: defaultdict(float))  # name -> phase -> self µs
    for ev in prof.events():
        if ev.name in PHASES or ev.name.startswith("ProfilerStep"):
            continue
        us = ev.self_cpu_time_total
        ops[ev.name] += us
        where[ev.name][phase_of(ev)] += us
    total = sum(ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]

    lines = [f"Workload {args.workload}, model.dtype {args.dtype}, mixed precision {args.mixed}; "
             f"{args.warmup} warm-up steps, {args.steps} timed + {args.steps} profiled steps; "
             f"{torch.get_num_threads()} threads; {run.path.name} path.", "",
             f"Step (no profiler): **{wall:.0f} ms** wall, {cpu:.0f} ms CPU (all threads), {timed_tokens:.0f} tokens/step, "
             f"{1000 * timed_tokens / wall:.0f} tokens/s.", "",
             "| phase | ms per step | share |", "|---|---:|---:|"]
    for name in PHASES:
        ms = phase_ms.get(name, 0.0)
        lines.append(f"| {name} | {ms:.1f} | {ms / wall:.1%} |")
    rest = wall - sum(phase_ms.values())
    lines += [f"| (loop, logging) | {rest:.1f} | {rest / wall:.1%} |", "",
              "| memory after | RSS GiB | peak GiB |", "|---|---:|---:|"]
    for name, (now, peak) in rss.items():
        lines.append(f"| {name} | {now:.2f} | {peak:.2f} |")
    losses = " ".join(f"{v:.6f}" for v in run.counters.pending_losses)
    lines += ["", f"Step losses (warm-up, timed, profiled): {losses}"]
    lines += ["", f"Top {args.top} kernels by self CPU time (profiled steps; profiler total "
              f"{total / 1000 / args.steps:.0f} ms per step):", "",
              "| op | self CPU ms/step | share | phases |", "|---|---:|---:|---|"]
    for name, us in top:
        phases = ", ".join(f"{p} {v / us:.0%}" for p, v in sorted(where[name].items(), key=lambda kv: -kv[1]) if v / us >= 0.05)
        lines.append(f"| `{name}` | {us / 1000 / args.steps:.1f} | {us / total:.1%} | {phases} |")
    if args.shapes:
        lines += ["", f"Top {args.shapes} (op, input shapes) by self CPU time:", "",
                  "| op | input shapes | calls/step | self CPU ms/step |", "|---|---|---:|---:|"]
        by_shape = sorted(prof.key_averages(group_by_input_shape=True), key=lambda a: -a.self_cpu_time_total)
        for a in [a for a in by_shape if a.key not in PHASES][:args.shapes]:
            lines.append(f"| `{a.key}` | {a.input_shapes} | {a.count / args.steps:.0f} | "
                         f"{a.self_cpu_time_total / 1000 / args.steps:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["A", "B"], default="A")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="bfloat16", help="model.dtype")
    ap.add_argument("--mixed", choices=["no", "bf16"], default="bf16", help="train.mixed_precision")
    ap.add_argument("--steps", type=int, default=6, help="timed steps, and as many profiled")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, default=160, help="train rows written by bench/run.py's data step")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--shapes", type=int, default=0, help="also list the top N (op, input shapes) rows")
    ap.add_argument("--out", help="also write the tables here (markdown)")
    args = ap.parse_args()
    text = profile(args, say=lambda s: print(s, file=sys.stderr, flush=True))
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
