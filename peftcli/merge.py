"""Folding an adapter into its base: ``peft merge RUN -o OUT`` writes a plain transformers dir.

For LoRA the merged weight is W + scale·B·A, summed in float32 and rounded once to the output
dtype (Hu et al. 2021, §4.1: "no additional inference latency"). A 4-bit or 8-bit base is
dequantised first, so a QLoRA run merges into dequant(W_nf4) + scale·B·A — the weights the
adapter was trained against (Dettmers et al. 2023, §3) — and the output is never re-quantised.
Layers keep the base's layout: a GPT-2 ``Conv1D`` (quantised by transformers into a (out, in)
bitsandbytes Linear) is written back as a Conv1D holding (in, out).
A tied output head that received an update gets its own storage and the config is untied, so
the input embedding stays bit-identical. The merged dir's tokenizer carries the chat template the
run trained with, and its ``generation_config`` stops at every stop id (EOS and the template's
end-of-turn token, :func:`peftcli.tokens.special_tokens`), so a plain ``generate`` stops where
``peft generate`` does (CASES C17).

A merge never destroys what it did not write (CASES C20): ``OUT`` must be new, empty, or a dir
peft merged into before, known by the :data:`MARKER` file listing the files that merge wrote;
``overwrite`` replaces those files only, and every other file in ``OUT`` is carried into the new
dir by hard link before the atomic swap.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import torch
from torch import nn

from peftcli import __version__, data, methods, models, tokens
from peftcli.artifacts import AdapterFiles, find_adapter_dir, load_adapted, method_name, read_adapter, read_adapter_config
from peftcli.atomic import atomic_dir
from peftcli.errors import UserError, writing

logger = logging.getLogger(__name__)

MARKER = "peft_merge.json"  # in a merged dir: who wrote it, from what, and the files it wrote


def merge_adapter(path: str | Path, out_dir: str | Path, dtype: str | None = None,
                  log: Callable[[str], None] | None = None, overwrite: bool = False) -> Path:
    """Merge the adapter at ``path`` (run dir or adapter dir) into its base and write a
    transformers model dir (safetensors weights, config, tokenizer, generation config, and
    :data:`MARKER`) to ``out_dir``, atomically (:func:`write_merged`).

    Args:
        path: a run dir or an adapter dir.
        out_dir: where the merged model goes: a new or empty dir, or (with ``overwrite``) one
            peft merged into before, whose other files are kept.
        dtype: ``float32 | bfloat16 | float16``; default the run's ``model.dtype`` (for a 4-bit base
            its compute dtype); where that is ``auto``, the dtype the base is stored in (its
            config.json), loaded in float32: a float32 base merges into float32 on any machine,
            never rounded to the bfloat16 a run on a CPU with bf16 units trained its base in.
        log: where the one-line summary goes (default: this module's logger at INFO).
        overwrite: replace the files of an earlier merge into ``out_dir`` (``--overwrite``).

    Returns ``out_dir``, which ``AutoModelForCausalLM.from_pretrained`` loads.

    Raises:
        UserError: the method cannot merge (its module's ``CANNOT_MERGE`` says why), an
        unknown dtype, ``out_dir`` refused by :func:`check_out_dir` (all three checked before
        the base is loaded), a write fault or name clash of :func:`write_merged`, or any error
        of :func:`peftcli.artifacts.load_adapted`.
    """
    log = log or logger.info
    if dtype is not None and dtype not in models.DTYPES:
        raise UserError(f"--dtype {dtype}: choose from {', '.join(models.DTYPES)}")
    out_dir = Path(out_dir)
    adapter_dir = find_adapter_dir(path)
    cfg = check_mergeable(adapter_dir)  # before loading the base
    peft_files = check_out_dir(out_dir, adapter_dir, cfg.get("base_model_name_or_path") or "",
                               overwrite)  # before the slow load
    merged = merge_in_memory(path, dtype)
    record = {"adapter": str(Path(merged.adapter_dir).resolve()), "dtype": merged.dtype}
    kept = write_merged(out_dir, merged.model, merged.tokenizer, record, peft_files)

    default = " (the base's stored dtype, for model.dtype auto; --dtype to change)" if merged.stored else \
        " (the dtype the run loaded its base in, model.dtype; --dtype to change)"
    chosen = f"dtype {merged.dtype}" + (default if dtype is None else "")
    yours = f"; kept {kept} other file(s) there" if kept else ""
    log(f"merged {merged.adapter_dir} into {out_dir}: {chosen}{merged.dequantised_note()}{yours}")
    return out_dir


def check_mergeable(adapter_dir: Path) -> dict:
    """The adapter config of ``adapter_dir``, once its method is known to merge (no model loaded).

    Raises:
        UserError: the method cannot merge (one line: its card's ``CANNOT_MERGE``), or what
        :func:`peftcli.artifacts.read_adapter_config` / ``method_name`` raise.
    """
    cfg = read_adapter_config(adapter_dir)
    name = method_name(cfg)
    method = methods.get(name)
    if method.CANNOT_MERGE is not None:
        raise UserError(f"method {name} cannot be merged: {method.CANNOT_MERGE}; use the adapter as is "
                        "(peft eval / peft generate)")
    return cfg


@dataclass
class Merged:
    """An adapter folded into its base, in memory (:func:`merge_in_memory`)."""

    model: nn.Module
    """A plain transformers model (fresh ``from_config``, no quantisation, eval mode) holding the
    merged weights in ``dtype``; its generation config stops at every stop id."""
    tokenizer: object
    """The base's tokenizer with the chat template the run trained with."""
    adapter_dir: Path
    dtype: str
    """The :data:`peftcli.models.DTYPES` name of the weights' dtype."""
    stored: str | None
    """The base's stored dtype where the run's ``model.dtype`` was ``auto`` (None otherwise)."""
    quantization: str
    """The base's ``model.quantization`` (``none`` or the 4/8-bit kind that was dequantised)."""

    def dequantised_note(self) -> str:
        """``"; the nf4 base was dequantised, not re-quantised"`` for a 4/8-bit base, else ``""``."""
        return f"; the {self.quantization} base was dequantised, not re-quantised" if self.quantization != "none" else ""


def merge_in_memory(path: str | Path | AdapterFiles, dtype: str | None = None) -> Merged:
    """Load the adapter at ``path`` on its base and fold it in: each method's ``merge`` (LoRA:
    W + scale·B·A summed in float32), every 4/8-bit Linear left dequantised, then a clean copy
    in the output dtype (:func:`plain_model`) with the run's chat template and stop ids. Nothing
    is written. The method is assumed mergeable (:func:`check_mergeable` first).

    Args:
        path: a run dir or an adapter dir, or what :func:`peftcli.artifacts.read_adapter` read from one.
        dtype: the output dtype, as :func:`merge_adapter` chooses it when None.

    Raises:
        UserError: what :func:`peftcli.artifacts.load_adapted` raises.
    """
    files = path if isinstance(path, AdapterFiles) else read_adapter(path)
    stored = None
    if files.model_config.dtype == "auto":  # the base as stored, not as this machine would train it
        stored = models.stored_dtype(models.resolve(files.model_config.name_or_path))
        files.model_config = files.model_config.model_copy(update={"dtype": "float32"})  # exact for any stored dtype
    loaded = load_adapted(files)
    model, tok, base = loaded.model, loaded.tokenizer, loaded.model_config

    quantized = base.quantization != "none"
    out_name = dtype or stored or base.dtype
    out_dtype = models.DTYPES[out_name]
    if not quantized and out_dtype != next(model.parameters()).dtype:
        model.float()  # exact; the merge then rounds once, to out_dtype, when the weights are copied

    methods.get(loaded.method).merge(model)
    dequantize_linears(model, torch.float32)
    clean = plain_model(model, out_dtype)
    data.use_recipe_chat(tok, loaded.recipe)
    clean.generation_config = stopping_generation_config(clean, tok)
    return Merged(model=clean, tokenizer=tok, adapter_dir=Path(loaded.adapter_dir), dtype=out_name, stored=stored,
                  quantization=base.quantization)


def write_merged(out_dir: Path, model: nn.Module, tokenizer, record: dict,
                 peft_files: frozenset[str] = frozenset()) -> int:
    """Write ``model`` (its weights, config and generation config), ``tokenizer`` and
    :data:`MARKER` (``record`` plus the list of files written) to ``out_dir`` through
    :func:`peftcli.atomic.atomic_dir`: into a temporary sibling, into which every entry of an
    existing ``out_dir`` other than ``peft_files`` is carried (:func:`carry_files`), then
    swapped in. A crash at any moment leaves the old dir or the new one complete on disk.

    Returns how many files of the old ``out_dir`` were carried over.

    Raises:
        UserError: a write fault (no space, read-only, no permission, something in the way:
        :func:`peftcli.errors.writing`, naming ``-o``), or a file in ``out_dir`` that is not
        one of ``peft_files`` has the name of a file this merge writes; ``out_dir`` is then
        as it was.
    """
    target = out_dir.resolve()  # a symlinked -o: write where it points, keep the link
    existed = target.is_dir()
    with _writing_out_dir(out_dir, target.parent), atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        marker = {"written_by": "peft merge", "peftcli_version": __version__, **record,
                  "files": written + [MARKER]}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        carried = carry_files(target, tmp, peft_files | {MARKER}) if existed else 0
        if existed:
            shutil.copymode(target, tmp)
    return carried


@contextmanager
def _writing_out_dir(out_dir: Path, place: Path) -> Iterator[None]:
    """:func:`peftcli.errors.writing` for ``-o out_dir``, saying that ``out_dir`` is as it was;
    a fault in one of its temporary siblings in ``place`` (removed by the time the message is
    read) names ``out_dir`` itself."""
    kept = f"-o {out_dir} is as it was" if out_dir.exists() else f"nothing was written to {out_dir}"
    with writing(out_dir, where="-o", kept=kept):
        try:
            yield
        except OSError as exc:
            if str(exc.filename or "").startswith(str(place / f".{out_dir.resolve().name}.")):
                exc.filename = None
            raise


def carry_files(old: Path, new: Path, skip: frozenset[str], prefix: str = "") -> int:
    """Bring every entry of dir ``old`` whose path relative to it (``a/b.txt``) is not in
    ``skip`` into dir ``new``, unchanged: a file (or symlink, or other non-dir) as a hard link
    to the same inode (``os.link``), a copy with its metadata where linking fails (another
    device, a file system without links); a subdir recreated with its mode and filled the same
    way. Returns the number of non-dir entries brought.

    Raises:
        UserError: ``new`` already has an entry of that name (this merge wrote one there).
        OSError: a link and then a copy failed (e.g. no space).
    """
    count = 0
    for entry in sorted(os.scandir(old), key=lambda e: e.name):
        rel = prefix + entry.name
        if rel in skip:
            continue
        dest = new / entry.name
        is_dir = entry.is_dir(follow_symlinks=False)
        if is_dir and dest.is_dir() and not dest.is_symlink():  # a subdir this merge wrote files into
            count += carry_files(Path(entry.path), dest, skip, rel + "/")
            continue
        if os.path.lexists(dest):
            raise UserError(f"{entry.path}: not a file peft merge wrote there, but this merge writes one of that "
                            "name; move it aside and merge again")
        if is_dir:
            dest.mkdir()
            count += carry_files(Path(entry.path), dest, skip, rel + "/")
            shutil.copystat(entry.path, dest, follow_symlinks=False)
            continue
        try:
            os.link(entry.path, dest, follow_symlinks=False)
        except OSError:
            shutil.copy2(entry.path, dest, follow_symlinks=False)
        count += 1
    return count


def stopping_generation_config(model: nn.Module, tokenizer):
    """A copy of ``model``'s generation config (or one made from its config) whose
    ``eos_token_id`` lists every stop id of :func:`peftcli.tokens.special_tokens` and whose
    ``pad_token_id`` is the tokenizer's when it had none."""
    from transformers import GenerationConfig

    base = model.generation_config
    config = copy.deepcopy(base) if base is not None else GenerationConfig.from_model_config(model.config)
    config.eos_token_id = list(tokens.special_tokens(tokenizer, base).stop_ids) or None
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def check_out_dir(out_dir: Path, adapter_dir: Path, base_path: str, overwrite: bool = False) -> frozenset[str]:
    """Check that ``peft merge -o out_dir`` may write there: not over (or into) the base or the
    adapter, and ``out_dir`` new, empty, or (with ``overwrite``) a dir peft merged into before.

    Returns the files the earlier merge wrote (:func:`read_marker`), which the new one replaces;
    empty for a new or empty dir.

    Raises:
        UserError: one line naming ``-o out_dir``: it overlaps the adapter or the base, is not a
        directory, is not empty and holds no :data:`MARKER` (refused even with ``overwrite``),
        or holds an earlier merge and ``overwrite`` is not set; or a write fault
        (:func:`peftcli.errors.writing`) found by making and removing an empty dir where
        :func:`write_merged` will make its temporary one (read-only, no permission, a file in
        the way).
    """
    target = out_dir.resolve()
    adapter = Path(adapter_dir).resolve()
    if target == adapter or target in adapter.parents or adapter in target.parents:
        raise UserError(f"-o {out_dir}: overlaps the adapter being merged ({adapter_dir}); merge into a new dir")
    base = Path(base_path).expanduser()
    if base_path and base.exists() and (base.resolve() == target or base.resolve() in target.parents):
        raise UserError(f"-o {out_dir}: is inside the base model dir; merge into a new dir")
    peft_files = _earlier_merge(out_dir, overwrite)
    place = next(p for p in target.parents if p.exists())  # where the temporary sibling's dir is made
    with _writing_out_dir(out_dir, place):
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=place))
    return peft_files


def _earlier_merge(out_dir: Path, overwrite: bool) -> frozenset[str]:
    """The files an earlier merge wrote into ``out_dir``; empty if it is new or empty. Raises
    :class:`UserError` as :func:`check_out_dir` says."""
    if not out_dir.exists():
        return frozenset()
    if not out_dir.is_dir():
        raise UserError(f"-o {out_dir}: exists and is not a directory; choose a new or empty dir")
    if not any(out_dir.iterdir()):
        return frozenset()
    peft_files = read_marker(out_dir)
    if peft_files is None:
        raise UserError(f"-o {out_dir}: is not empty and peft merge did not write it (no {MARKER}); "
                        "choose a new or empty dir")
    if not overwrite:
        raise UserError(f"-o {out_dir}: holds an earlier peft merge; pass --overwrite to replace the files it "
                        "wrote (your other files there are kept), or choose a new dir")
    return peft_files


def read_marker(out_dir: Path) -> frozenset[str] | None:
    """The files (paths relative to ``out_dir``, ``/``-separated) that ``peft merge`` wrote into
    ``out_dir``, read from its :data:`MARKER`; None if there is none, or it is not one peft
    wrote (not JSON, another ``written_by``, a path that is absolute or climbs with ``..``)."""
    try:
        marker = json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = marker.get("files") if isinstance(marker, dict) and marker.get("written_by") == "peft merge" else None
    if not isinstance(files, list) or not all(isinstance(f, str) and _plain_relative(f) for f in files):
        return None
    return frozenset(files)


def _plain_relative(path: str) -> bool:
    """``path`` is a normalised relative path that stays inside its dir (``a/b``, not ``../a``,
    ``/a`` or ``./a``)."""
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts and p.as_posix() == path


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every bitsandbytes 4/8-bit Linear left in ``model`` by a plain ``nn.Linear``
    holding ``models.dequantized_weight`` (the values the quantised layer computes with) in
    ``dtype`` — a ``Conv1D`` holding its transpose where transformers quantised a Conv1D (GPT-2),
    so the model's own layout comes back. Returns how many were replaced."""
    names = [n for n, m in model.named_modules() if models.is_quantized_linear(m)]
    for name in names:
        q = model.get_submodule(name)
        model.set_submodule(name, models.plain_linear(models.dequantized_weight(q), q.bias, q, dtype))
    return len(names)


def plain_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A fresh ``from_config`` copy of a merged model, in ``dtype``, without quantisation, with
    the merged weights loaded (strict: every key must fit). The output head is tied to the input
    embedding only if they still share storage."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    if not tied:
        _untie(config)
    clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    clean.load_state_dict(state, strict=True)
    if tied:
        clean.tie_weights()
    if model.generation_config is not None:
        clean.generation_config = model.generation_config
    return clean.eval()


def _untie(config) -> None:
    """Record that the output head has its own weights, so a reload does not re-tie it."""
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        text.tie_word_embeddings = False
