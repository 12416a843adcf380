"""The model zoo: a tiny random model of every decoder family, and the method variants run on each.

``FAMILIES`` has one line per decoder family: the transformers ``model_type`` and the config
overrides that make it tiny (hidden 64, 2 layers, 4 heads, the vocabulary of
:func:`tiny.tiny_tokenizer`) while keeping what makes the family itself (grouped-query heads,
sliding windows smaller than a training row, logit soft-caps and scales big enough to move a
loss at this size, MoE experts, partial rotary, ALiBi, Conv1D, ...). ``VARIANTS`` has one line
per method variant of the registry: our recipe's ``method`` section, the Hugging Face peft
config that is the same method (None where HF peft has none), and whether its start is the
identity (so the first logged loss is the base model's own loss). Adding a family or a variant
is one line; ``tests/test_zoo.py`` runs every family × variant.

``python tests/zoo.py matrix OUT.md [pytest args]`` runs the zoo and writes the pass/fail matrix to
OUT.md; ``ZOO_FAMILIES=all`` (see :func:`families`) widens it to every causal LM type.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_tokenizer  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
GQA = dict(intermediate_size=128, num_key_value_heads=2)  # the Llama-style families
WINDOW = 16  # sliding window, in tokens: less than every training row (~60 tokens), so it matters
MOE = dict(num_experts_per_tok=2)
# the two families whose configs default to dropout: off, so a training forward is deterministic
# and the first logged loss can be compared with the model's own (eval-mode) forward
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "opt": dict(dropout=0.0)}

# family: (model_type, config overrides on TINY). Soft-caps and logit scales are set so that, on
# logits of a random tiny model (std ~0.2), the transform changes the loss by far more than 1e-5.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama":     ("llama", GQA),
    "mistral":   ("mistral", {**GQA, "sliding_window": WINDOW}),
    "mistral_wide": ("mistral", {**GQA, "sliding_window": 4 * WINDOW}),  # a window longer than the rows
    "qwen2":     ("qwen2", GQA),
    "qwen3":     ("qwen3", {**GQA, "head_dim": 16}),
    "qwen3_moe": ("qwen3_moe", {**GQA, **MOE, "head_dim": 16, "num_experts": 4, "moe_intermediate_size": 32}),
    "mixtral":   ("mixtral", {**GQA, **MOE, "intermediate_size": 64, "num_local_experts": 4}),
    "gemma":     ("gemma", {**GQA, "head_dim": 16}),
    "gemma2":    ("gemma2", {**GQA, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW,
                             "final_logit_softcapping": 0.5, "attn_logit_softcapping": 1.0}),
    "gemma3":    ("gemma3_text", {**GQA, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW,
                                  "layer_types": ["sliding_attention", "full_attention"]}),
    "phi":       ("phi", GQA),
    "phi3":      ("phi3", GQA),
    "gpt2":      ("gpt2", {"n_inner": 128, **NO_DROPOUT["gpt2"]}),
    "gpt_neox":  ("gpt_neox", {"intermediate_size": 128}),
    "opt":       ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 64, **NO_DROPOUT["opt"]}),
    "falcon":    ("falcon", {"ffn_hidden_size": 128}),
    "olmo2":     ("olmo2", GQA),
    "granite":   ("granite", {**GQA, "embedding_multiplier": 12.0, "logits_scaling": 8.0, "residual_multiplier": 0.22,
                              "attention_multiplier": 0.0625}),
    "stablelm":  ("stablelm", GQA),
    "cohere":    ("cohere", {**GQA, "logit_scale": 4.0}),
    "smollm3":   ("smollm3", {**GQA, "no_rope_layer_interval": 2}),
    "gptj":      ("gptj", {"n_inner": 128, "rotary_dim": 8}),
    "bloom":     ("bloom", {}),
}

# cells where the method truly cannot apply: the run must stop with this one-line reason (a
# UserError), not train. Mistral's window (every layer) is shorter than the rows, so tokens put
# before the text are out of every supervised token's reach ("mistral_wide" runs them).
REFUSED: dict[tuple[str, str], str] = {
    ("mistral", v): "sliding window (16 tokens) is shorter than these rows" for v in ("prefix", "prompt", "p_tuning")}

MAX_PARAMS = 5_000_000
GENERIC = {**GQA, "head_dim": 16}  # ZOO_FAMILIES=all: every other causal LM type, untuned


def families() -> dict[str, tuple[str, dict]]:
    """FAMILIES; with ``ZOO_FAMILIES=all`` also every other model type transformers maps to a
    ``*ForCausalLM`` (GENERIC overrides, untuned: an exploration, not the default run), with
    ``ZOO_FAMILIES=a,b`` only those."""
    chosen = os.environ.get("ZOO_FAMILIES")
    if not chosen:
        return FAMILIES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    covered = {model_type for model_type, _ in FAMILIES.values()}
    every = {**{t: (t, GENERIC) for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t not in covered}, **FAMILIES}
    return every if chosen == "all" else {f: every[f] for f in chosen.split(",")}


LORA = dict(r=4, alpha=8, dropout=0.1, target_modules="all-linear")
HF_LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")  # HF peft's own adapters: no dropout (never used in eval)
MLP_OUT = r".*\.(down_proj|fc2|fc_out|dense_4h_to_h|mlp\.c_proj)"  # IA3's feed-forward outputs, every family
VIRTUAL = 4  # virtual tokens of the prompt methods


@dataclass(frozen=True)
class Variant:
    """One method variant: our recipe ``method`` section; the HF peft config class and keys of the
    same method (``hf=None``: HF peft has none); ``identity_init``: the adapted model starts equal
    to the base (zero LoRA B, unit IA3 vectors, zero adapter up-projection)."""

    method: dict
    hf: tuple[str, dict] | None
    identity_init: bool = True
    quantized: bool = False


VARIANTS: dict[str, Variant] = {
    "lora":        Variant({"name": "lora", **LORA}, ("LoraConfig", HF_LORA)),
    "dora":        Variant({"name": "lora", **LORA, "dora": True}, ("LoraConfig", {**HF_LORA, "use_dora": True})),
    "rslora":      Variant({"name": "lora", **LORA, "rslora": True}, ("LoraConfig", {**HF_LORA, "use_rslora": True})),
    "qlora":       Variant({"name": "qlora", **LORA}, ("LoraConfig", HF_LORA), quantized=True),
    "houlsby":     Variant({"name": "adapter", "variant": "houlsby"}, None),
    "pfeiffer":    Variant({"name": "adapter", "variant": "pfeiffer"}, None),
    "ia3":         Variant({"name": "ia3", "target_modules": "all-linear", "feedforward_modules": MLP_OUT},
                           ("IA3Config", {"target_modules": "all-linear", "feedforward_modules": MLP_OUT})),
    "prefix":      Variant({"name": "prefix_tuning", "num_virtual_tokens": VIRTUAL},
                           ("PrefixTuningConfig", {"num_virtual_tokens": VIRTUAL}), identity_init=False),
    "prompt":      Variant({"name": "prompt_tuning", "num_virtual_tokens": VIRTUAL},
                           ("PromptTuningConfig", {"num_virtual_tokens": VIRTUAL}), identity_init=False),
    "p_tuning":    Variant({"name": "p_tuning", "num_virtual_tokens": VIRTUAL, "encoder_hidden_size": 32},
                           ("PromptEncoderConfig", {"num_virtual_tokens": VIRTUAL, "encoder_hidden_size": 32}),
                           identity_init=False),
}


def tiny_config(family: str, tokenizer):
    """The tiny transformers config of ``family`` for ``tokenizer``'s vocabulary and special ids."""
    from transformers import AutoConfig

    model_type, overrides = families()[family]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **TINY, **ids, **overrides)


def save_family(path: Path, family: str, seed: int = 0) -> Path:
    """Write a tiny random ``family`` model (float32, safetensors) + :func:`tiny_tokenizer` to ``path``."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = tiny_config(family, tok)
    with torch.device("meta"):  # sized first: an untuned GENERIC config can still ask for gigabytes
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"{family}: the tiny config still has {n:,} parameters (more than {MAX_PARAMS:,})")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# the matrix


@dataclass
class Cell:
    """The outcome of one zoo cell: the checks that ran and the ones that failed (check -> one line)."""

    family: str
    variant: str
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # check -> why it could not run (not our code)
    loss_path: str | None = None  # the trainer's summary["loss_path"], where it records one
    padding_free: bool | None = None  # the trainer's summary["padding_free"]
    seconds: float = 0.0


KEEP = "<!-- hand-written below: kept when the matrix is regenerated -->"


def _status(c: dict) -> str:
    if "base" in c["notes"]:
        return "tiny config does not run in transformers"
    if c["failed"]:
        return ", ".join(c["failed"])
    if "refused" in c["ran"]:
        return "refused, as it must (one line)"
    return "pass" + (f" (n/a: {', '.join(c['notes'])})" if c["notes"] else "")


def render_matrix(cells: list[dict], note: str = "") -> str:
    """Markdown: a family × variant table (``pass`` or the checks that failed), then each failure's
    one-line reason, each check that could not run and why, and the time per variant."""
    by = {(c["family"], c["variant"]): c for c in cells}
    families = list(dict.fromkeys(list(FAMILIES) + [c["family"] for c in cells]))
    columns = list(dict.fromkeys(["family", *VARIANTS] + [c["variant"] for c in cells]))
    columns = [v for v in columns if any((f, v) in by for f in families)]
    lines = [note, "", "| family | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for f in families:
        lines.append(f"| {f} | " + " | ".join(_status(by[f, v]) if (f, v) in by else "—" for v in columns) + " |")
    passed = sum(1 for c in cells if not c["failed"] and "base" not in c["notes"])
    lines += ["", f"{passed} of {len(cells)} cells pass (`family` = the base runs in transformers + `all-linear` "
              "= HF peft's set; `cli:*` = `peft train --smoke`).", "", "## Failures (family / column / check: reason)", ""]
    lines += [f"- {c['family']} / {c['variant']} / {k}: {why}" for c in cells for k, why in c["failed"].items()]
    lines += ["", "## Checks that could not run (not peftcli's code)", ""]
    lines += [f"- {c['family']} / {c['variant']} / {k}: {why}" for c in cells for k, why in c["notes"].items()]
    def path_of(c: dict) -> str | None:
        p = c.get("loss_path")
        return p.get("name") if isinstance(p, dict) else p

    paths = sorted({path_of(c) for c in cells if path_of(c)})
    if paths:
        lines += ["", "Loss paths the trainer chose (`peftcli.guard`):", ""]
        lines += [f"- {p}: " + ", ".join(f"{c['family']}/{c['variant']}" for c in cells if path_of(c) == p) for p in paths]
    seconds = {v: sum(c.get("seconds", 0.0) for c in cells if c["variant"] == v) for v in VARIANTS}
    lines += ["", "Seconds per variant (all families): " + ", ".join(f"{v} {t:.0f}" for v, t in seconds.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``python tests/zoo.py matrix OUT.md [pytest args]``: run the zoo, write the matrix."""
    import subprocess
    import tempfile
    import time

    if len(argv) < 2 or argv[0] != "matrix":
        print(__doc__)
        return 2
    out = Path(argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "cells.jsonl"
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(Path(__file__).parent / "test_zoo.py"), *argv[2:]],
                             env={**os.environ, "ZOO_RESULTS": str(results)})
        wall = time.perf_counter() - t0
        cells = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    note = (f"# Zoo matrix\n\n{len(FAMILIES)} families × {len(VARIANTS)} method variants, measured on commit {commit}; "
            f"`python tests/zoo.py matrix {out}` regenerates it. Wall {wall:.0f} s (pytest exit {rc}) on "
            f"{os.cpu_count()} cores, load average {load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end.")
    kept = out.read_text().split(KEEP, 1)[1] if out.exists() and KEEP in out.read_text() else "\n"
    out.write_text(render_matrix(cells, note) + "\n" + KEEP + kept)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
