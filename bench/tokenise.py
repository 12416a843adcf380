"""Tokenisation benchmark: 100k alpaca rows, first run (empty token cache) and cached run.

    python bench/tokenise.py [--rows 100000] [--max-seq-len 512] [--no-compare]

Rows: ``../shared/data/alpaca/train.jsonl`` (or ``$PEFTCLI_SHARED_DATA/alpaca``), repeated up to
``--rows``; without it the script says so and exits 0. Tokenizer: the embedded model's
(``smollm2-135m``, converted once under the peft home before any timing). The token cache goes to
a fresh temporary peft home, so the first run always tokenises.

Timed, each in this process: the fingerprint alone (hashing the rows and the tokenizer), the
first ``data.tokenize_rows`` (fingerprint + tokenise + save), the second (fingerprint + load),
and with ``--compare`` (default) the tokenising alone, serial and across worker processes.
Prints a markdown table row (header first) for docs/benchmarks.md. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PEFTCLI_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--no-compare", action="store_true", help="skip the serial vs parallel timings")
    args = parser.parse_args(argv)
    source = SHARED / "alpaca" / "train.jsonl"
    if not source.is_file():
        print(f"skipped: {source} not found (the alpaca rows are not bundled)")
        return 0

    from peftcli import data, models, parallel, token_cache, tokens

    tok = models.load_tokenizer(models.resolve("smollm2-135m"))  # the conversion happens here, untimed
    base = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = (base * (args.rows // len(base) + 1))[: args.rows]
    settings = (tok, args.max_seq_len, False)
    with tempfile.TemporaryDirectory(prefix="peftcli-bench-tokens-") as home:
        os.environ["PEFTCLI_HOME"] = home  # the cache only: the model dir was resolved above
        os.environ.pop(token_cache.ENV, None)
        _, t_key = _timed(lambda: token_cache.fingerprint(rows, tok, {"format": "alpaca"}))
        (first, stats), t_first = _timed(lambda: data.tokenize_rows(rows, "alpaca", *settings, "alpaca"))
        (again, _), t_cached = _timed(lambda: data.tokenize_rows(rows, "alpaca", *settings, "alpaca"))
        assert again == first, "the cached examples differ from the tokenised ones"
        size = sum(f.stat().st_size for f in Path(home).rglob("*") if f.is_file())
    t_serial = t_parallel = float("nan")
    workers = parallel.workers(max(len(rows), parallel.PARALLEL_MIN_ROWS))
    if not args.no_compare:
        special = tokens.special_tokens(tok)
        one_pass = lambda: parallel.map_rows(data.tokenize_row, rows, "alpaca", ("alpaca", tok, args.max_seq_len, False, special))  # noqa: E731
        keep = parallel.PARALLEL_MIN_ROWS
        try:
            parallel.PARALLEL_MIN_ROWS = len(rows) + 1
            serial_out, t_serial = _timed(one_pass)
            parallel.PARALLEL_MIN_ROWS = 0
            parallel_out, t_parallel = _timed(one_pass)
        finally:
            parallel.PARALLEL_MIN_ROWS = keep
        assert parallel_out == serial_out, "parallel tokenisation differs from serial"
    n_tokens = sum(len(e["input_ids"]) for e in first)
    print("| rows | tokens | fingerprint | first run | cached run | cache size | tokenise serial | "
          f"tokenise parallel ({workers} workers) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {len(rows):,} ({stats.kept:,} kept) | {n_tokens:,} | {t_key:.2f} s | {t_first:.1f} s | "
          f"{t_cached:.2f} s | {size / 2**20:.0f} MiB | {t_serial:.1f} s | {t_parallel:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
