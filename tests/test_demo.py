"""The README's demo table is what `make demo` prints today (slow: the real model, the full demo).

`make demo` is `peft train peftcli/recipes/demo.yaml` then `peft eval runs/demo`. This runs the same
two commands into a temporary run dir and compares the eval with the table the README quotes for
the precision this machine chose (the README holds one table per `train.mixed_precision` the demo
resolves to, each after a `<!-- demo-table mixed_precision=... -->` marker). Held-out loss must be
within 2% of the README's and exact match less than 3 points (rows of 100) away: the demo is
seeded, and the slack is for other CPUs of the same kind, whose kernels round differently. The
drift that made this test (80.0% quoted, 83.0% printed) fails it.
"""

import json
import re

import pytest
from test_e2e import PEFT, ROOT, peft  # noqa: F401  (PEFT: the venv's command, as make demo runs it)

pytestmark = pytest.mark.slow

ROW = re.compile(r"│ (base|adapted)\s+│\s+([\d.]+) │\s+([\d.]+) │\s+([\d.]+)% │")


def readme_table(mixed_precision: str) -> dict[str, tuple[float, float]]:
    """{"base"|"adapted": (loss, exact match %)} from the README table after the marker."""
    text = (ROOT / "README.md").read_text()
    marker = f"<!-- demo-table mixed_precision={mixed_precision} -->"
    assert marker in text, f"README has no demo table for mixed_precision={mixed_precision}"
    rows = {}
    for line in text.split(marker, 1)[1].splitlines()[1:12]:
        if m := ROW.search(line):
            rows[m[1]] = (float(m[2]), float(m[4]))
    assert set(rows) == {"base", "adapted"}, f"README demo table after {marker} is not base/adapted rows"
    return rows


def test_readme_table_parses():
    for mp in ("bf16", "no"):
        table = readme_table(mp)
        assert table["adapted"][1] > table["base"][1] and table["adapted"][0] < table["base"][0]


def test_demo_prints_the_readme_table(tmp_path):
    run = tmp_path / "demo"
    peft("train", "peftcli/recipes/demo.yaml", "--output-dir", str(run))
    got = json.loads(peft("eval", str(run), "--json").stdout)
    summary = json.loads((run / "summary.json").read_text())
    quoted = readme_table(summary["mixed_precision"])
    for model in ("base", "adapted"):
        loss, em = got[model]["loss"], 100 * got[model]["exact_match"]
        q_loss, q_em = quoted[model]
        assert abs(loss - q_loss) <= 0.02 * q_loss and abs(em - q_em) < 3.0, (
            f"{model}: this run {loss:.4f} / {em:.1f}%, README {q_loss:.4f} / {q_em:.1f}% "
            f"(mixed_precision={summary['mixed_precision']}): re-measure `make demo` and update the README")
