"""``peft train --smoke``: a few steps on a few rows, then the checks a CI job needs —
the loss is finite, and the saved adapter reloads to the same logits as the trained model."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

SMOKE_OVERRIDES = [
    "train.max_steps=4", "data.max_samples=16", "train.micro_batch_size=2", "train.grad_accum=1",
    "train.log_every=1", "train.eval_every=0", "train.save_every=0", "train.eval_max_samples=4",
    "train.warmup_steps=0",  # 4 steps: a recipe's warmup would keep the learning rate near 0 throughout
]


def load_recipe(path, overrides: list[str] = (), output_dir: str | None = None):
    """The recipe at ``path`` as ``--smoke`` runs it: :data:`SMOKE_OVERRIDES` first (the user's
    ``--set`` wins over them), into ``OUTPUT.DIR-smoke`` unless ``--output-dir`` names one.

    Raises:
        UserError: as :func:`peftcli.recipe.load_recipe`.
    """
    from peftcli.recipe import load_recipe as load

    recipe = load(path, SMOKE_OVERRIDES + list(overrides), output_dir)
    if not output_dir:
        recipe.output.dir = recipe.output.dir.rstrip("/") + "-smoke"
    return recipe


@dataclass
class SmokeReport:
    ok: bool = True
    lines: list[str] = field(default_factory=list)

    def record(self, passed: bool, what: str) -> None:
        self.ok &= passed
        self.lines.append(f"smoke {'ok  ' if passed else 'FAIL'} {what}")


REPORT = "smoke.json"  # the report in the smoke run's dir; it also marks the dir as a smoke run's


def replaces(run_dir) -> bool:
    """Whether a smoke run may replace what is in ``run_dir`` without ``--overwrite``: only the
    run of an earlier smoke (its :data:`REPORT` is there), never a real run that happens to have
    the ``-smoke`` name."""
    from pathlib import Path

    return (Path(run_dir) / REPORT).is_file()


def write_report(run_dir, report: SmokeReport) -> None:
    """``RUN/smoke.json``: whether every check passed and each check's line."""
    from pathlib import Path

    from peftcli.atomic import write_json_atomic
    from peftcli.errors import writing

    path = Path(run_dir) / REPORT
    with writing(path, "output.dir"):
        write_json_atomic(path, {"ok": report.ok, "lines": report.lines})


def check(result) -> SmokeReport:
    """Check a finished smoke run (a :class:`peftcli.trainer.TrainResult`)."""
    import torch  # here, not at the top: loading a --smoke recipe (a bad one included) stays light

    from peftcli import artifacts, data, models
    from peftcli.rundir import RunDir, read_events

    with torch.no_grad():
        report = SmokeReport()
        losses = [e["loss"] for e in read_events(RunDir(result.run_dir).metrics) if e.get("event") == "train"]
        report.record(bool(losses) and all(math.isfinite(x) for x in losses),
                      f"loss finite over {len(losses)} steps (first {losses[0]:.4f}, last {losses[-1]:.4f})"
                      if losses else "no loss logged")
        # reloaded in the dtype the run chose (auto chooses for the GPU in a run, for the CPU in a load)
        chosen = result.summary["precision"]
        reloaded = artifacts.load_adapted(result.run_dir, {"dtype": chosen["dtype"]})
        batch = data.collate(result.datasets.train[:2], reloaded.tokenizer.pad_token_id)
        device = next(result.model.parameters()).device
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        cast = contextlib.nullcontext()
        if chosen.get("linear_dtype"):  # the trained model's Linear weights are stored for its autocast: both run under it
            models.store_linear_weights(reloaded.model, getattr(torch, chosen["linear_dtype"]))
            cast = torch.autocast(device.type, dtype=getattr(torch, chosen["linear_dtype"]))
        with cast:
            a = result.model.eval()(**inputs).logits.float()
            b = reloaded.model(**inputs).logits.float().to(device)
        diff = float((a - b).abs().max())
        report.record(diff <= 1e-4 * max(1.0, float(a.abs().max())), f"adapter saved and reloaded: max logit difference {diff:.2e}")
        adapter_finite = all(torch.isfinite(p).all() for p in result.model.parameters() if p.requires_grad)
        report.record(bool(adapter_finite), "adapter weights finite")
        return report
