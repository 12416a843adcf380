"""``peft export RUN --gguf OUT.gguf``: the merged model as one GGUF file for llama.cpp / Ollama.

The adapter is folded into its base in memory exactly as ``peft merge`` does it
(:func:`peftcli.merge.merge_in_memory`, float32: W + scale·B·A, a 4/8-bit base dequantised, never
re-quantised from its NF4 blocks), and the result is written with the ``gguf`` package's
``GGUFWriter`` in llama.cpp's layout (no llama.cpp build, no conversion script):

- tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ... ``ffn_down``,
  ``output_norm``, ``output`` when the head is not tied), named by ``gguf.get_tensor_name_map``;
- for the ``llama`` GGUF architecture the rows of Q and K permuted as llama.cpp's
  ``convert_hf_to_gguf.py`` does (``LlamaModel.permute``): HF's rotary embedding rotates the two
  halves of each head, llama.cpp's rotates adjacent pairs (Su et al. 2021, RoFormer §3.4.2, the
  same rotation on another pairing of the dimensions); ``qwen2`` keeps HF's order (llama.cpp
  runs it with the "NeoX" pairing). transformers' GGUF reader undoes the permutation
  (``LlamaTensorProcessor``), which is how the round trip is checked;
- the hyperparameters, the tokenizer (byte-level BPE: ``tokenizer.ggml.model = gpt2``, tokens,
  token types, merges, the pre-tokenizer's name, BOS/EOS/UNK/PAD and end-of-turn ids) and the
  chat template the run trained with.

Dtypes: ``f32``, ``f16`` and ``q8_0`` (blocks of 32 int8 with one f16 scale, ``gguf.quants``);
1-D tensors (norms, biases) stay float32 as llama.cpp keeps them, and a q8_0 matrix whose rows
are not a multiple of 32 long is written f16.

Families: Llama-style bases, ``llama`` and ``mistral`` (written as GGUF ``llama``, as llama.cpp
does) and ``qwen2``; any other family, and a variant the file cannot describe (rope scaling,
biases on a Llama, a sliding window), is refused in one line before the model is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from peftcli import models, tokens
from peftcli.artifacts import find_adapter_dir, read_adapter
from peftcli.atomic import atomic_file
from peftcli.errors import UserError, writing
from peftcli.merge import check_mergeable, merge_in_memory

logger = logging.getLogger(__name__)

GGUF_DTYPES = ("f16", "f32", "q8_0")
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers model_type -> GGUF architecture
PERMUTED = {"llama"}  # the GGUF architectures whose Q/K rows llama.cpp permutes for its rotary pairing
Q8_BLOCK = 32  # values per Q8_0 block (ggml's QK8_0)


def export_gguf(path: str | Path, out: str | Path, dtype: str = "f16", overwrite: bool = False,
                log: Callable[[str], None] | None = None) -> Path:
    """Merge the adapter at ``path`` into its base and write one GGUF file to ``out``, atomically.

    Args:
        path: a run dir or an adapter dir (as ``peft merge`` takes).
        out: the GGUF file to write; an existing file is replaced only with ``overwrite``.
        dtype: ``f16`` (default), ``f32`` or ``q8_0`` for the matrices (1-D tensors stay f32).
        log: where the one-line summary goes (default: this module's logger at INFO).

    Returns ``out``.

    Raises:
        UserError: an unknown dtype, no run/adapter at ``path``, a method that cannot merge, a
        base family (or variant) GGUF export does not write, a tokenizer it cannot describe, or
        ``out`` refused by :func:`check_out_file` — all before the base's weights are loaded —
        and write faults (one line naming ``--gguf``, ``out`` as it was).
    """
    log = log or logger.info
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype}: choose from {', '.join(GGUF_DTYPES)}")
    out = Path(out)
    check_mergeable(find_adapter_dir(path))
    check_out_file(out, overwrite)
    files = read_adapter(path)
    base_path = models.resolve(files.model_config.name_or_path)
    config = base_config(base_path)
    arch = gguf_architecture(config)
    gguf_vocab(models.load_tokenizer(base_path), config.vocab_size)  # a tokenizer it cannot write: before the load

    merged = merge_in_memory(files, "float32")  # rounded once, to the GGUF dtype, below
    vocab = gguf_vocab(merged.tokenizer, merged.model.get_input_embeddings().num_embeddings)
    written = write_gguf(out, merged.model, vocab, arch, dtype)

    family = config.model_type if config.model_type == arch else f"{config.model_type}, as GGUF {arch}"
    fallback = f"; {written.f16_fallback} matrices with rows not a multiple of {Q8_BLOCK} long in f16" \
        if written.f16_fallback else ""
    log(f"exported {merged.adapter_dir} to {out}: {family}, {dtype} ({written.tensors} tensors, "
        f"{out.stat().st_size / 2**20:.1f} MiB){fallback}{merged.dequantised_note()}")
    return out


def check_out_file(out: Path, overwrite: bool) -> None:
    """Check that ``--gguf out`` may be written: not a directory, not an existing file unless
    ``overwrite``, and its place writable (probed by creating and removing an empty file in the
    nearest existing parent dir, before the slow load).

    Raises:
        UserError: one line naming ``--gguf out`` (a write fault through
        :func:`peftcli.errors.writing`).
    """
    if out.is_dir():
        raise UserError(f"--gguf {out}: is a directory; name the file to write, e.g. {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise UserError(f"--gguf {out}: exists; pass --overwrite to replace it, or choose a new name")
    place = next(p for p in Path(os.path.abspath(out)).parents if p.exists())
    with writing(out, where="--gguf", kept=f"nothing was written to {out}"):
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=place)
        os.close(fd)
        os.unlink(probe)


def base_config(base_path: str):
    """The base's transformers config (``AutoConfig`` from its config.json; no weights read).

    Raises:
        UserError: the config cannot be read, or names a ``model_type`` transformers lacks.
    """
    from transformers import AutoConfig

    raw = dict(models.config_dict(base_path))
    model_type = raw.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError):
        raise UserError(f"model {base_path}: config.json names model_type {model_type!r}, which this transformers "
                        "does not know") from None


def rope(config) -> tuple[str, float]:
    """(rope type, rope theta) of a config: transformers 5's ``rope_parameters``, else the
    older ``rope_scaling`` / ``rope_theta`` attributes."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return kind, float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def head_dim(config) -> int:
    """The width of one attention head: ``head_dim`` where the config sets it, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gguf_architecture(config) -> str:
    """The GGUF ``general.architecture`` a base is written as (:data:`FAMILIES`).

    Raises:
        UserError: one line naming the family and the supported list, or the variant of a
        supported family that the GGUF file (or transformers' reader of it) cannot describe.
    """
    family = config.model_type
    if family not in FAMILIES:
        raise UserError(f"peft export --gguf: the {family} family is not exported (supported: {', '.join(FAMILIES)}); "
                        "peft merge -o DIR writes a transformers dir instead")
    kind, _ = rope(config)
    window = getattr(config, "sliding_window", None)
    refusals = [
        (kind != "default", f"rope type {kind} (scaled rotary positions)"),
        (getattr(config, "hidden_act", "silu") != "silu", f"hidden_act {getattr(config, 'hidden_act', None)}"),
        (FAMILIES[family] == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)),
         "attention or MLP biases"),
        (family == "mistral" and window is not None and window < config.max_position_embeddings,
         f"a sliding attention window of {window} tokens"),
        (family == "qwen2" and getattr(config, "use_sliding_window", False), "use_sliding_window"),
        (family == "qwen2" and head_dim(config) != config.hidden_size // config.num_attention_heads,
         f"head_dim {head_dim(config)} (not hidden_size / heads)"),
    ]
    for refused, what in refusals:
        if refused:
            raise UserError(f"peft export --gguf: this {family} base has {what}, which the GGUF export does not "
                            "write; peft merge -o DIR writes a transformers dir instead")
    return FAMILIES[family]


# ---------------------------------------------------------------------------------------------
# the tokenizer


@dataclass
class Vocab:
    """A tokenizer as GGUF's ``tokenizer.ggml.*`` keys describe it (:func:`gguf_vocab`)."""

    model: str
    """``tokenizer.ggml.model``: ``gpt2`` (byte-level BPE)."""
    pre: str
    """``tokenizer.ggml.pre``: the name llama.cpp (and transformers' reader) know its text split by."""
    tokens: list[str]
    """One per embedding row, in id order; rows past the tokenizer are ``[PAD<id>]``."""
    types: list[int]
    """``gguf.TokenType`` per token: NORMAL, CONTROL (special), USER_DEFINED (added), UNUSED."""
    merges: list[str]
    """The BPE merges, ``"a b"``, in rank order."""
    tokenizer: object
    """The tokenizer itself (its special ids and chat template are read from it)."""


def gguf_vocab(tok, rows: int) -> Vocab:
    """Describe a byte-level BPE tokenizer for GGUF.

    Args:
        tok: a fast (``tokenizers``-backed) transformers tokenizer.
        rows: the input embedding's row count: the GGUF vocab has exactly that many tokens.

    Raises:
        UserError: not a byte-level BPE (e.g. SentencePiece-style, ``byte_fallback``), a
        pre-tokenizer no GGUF name describes, or more tokens than embedding rows.
    """
    from gguf import TokenType

    backend = json.loads(tok.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        kind = "SentencePiece-style BPE" if model.get("byte_fallback") else str(model.get("type"))
        raise UserError(f"peft export --gguf: the base's tokenizer is {kind}; only byte-level BPE tokenizers "
                        "(GPT-2 style: SmolLM2, Llama 3, Qwen2) are written")
    if len(tok) > rows:
        raise UserError(f"peft export --gguf: the tokenizer has {len(tok)} tokens, the embedding {rows} rows")
    added = tok.added_tokens_decoder
    names = tok.convert_ids_to_tokens(list(range(len(tok))))
    tokens_, types = [], []
    for i in range(rows):
        name = names[i] if i < len(names) else None
        if name is None:
            tokens_.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens_.append(name)
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return Vocab("gpt2", pre_tokenizer_name(backend.get("pre_tokenizer")), tokens_, [int(t) for t in types], merges, tok)


def pre_tokenizer_name(pre: dict | None) -> str:
    """The ``tokenizer.ggml.pre`` name of a byte-level tokenizer's pre-tokenizer (its
    ``tokenizer.json`` form): ``gpt2`` for a plain ``ByteLevel`` with its GPT-2 regex,
    ``smollm`` for single digits then ``ByteLevel``, and for a ``Split`` regex then ``ByteLevel``
    the name transformers' GGUF reader maps to that same regex (``llama-bpe``, ``qwen2``, ...).

    Raises:
        UserError: none of these (the split could not be written faithfully).
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    if kinds[-1:] == ["ByteLevel"] and not last.get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and last.get("use_regex", True):
            return "gpt2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
            regex = (steps[0].get("pattern") or {}).get("Regex")
            name = next((n for n, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex), None)
            if name is not None:
                return name
    raise UserError(f"peft export --gguf: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) "
                    "has no GGUF name; the text would be split differently there")


def add_vocab(writer, vocab: Vocab) -> None:
    """The ``tokenizer.*`` keys: model, pre-tokenizer, tokens, types, merges, special ids, whether
    BOS/EOS are added, and the chat template (the one the run trained with)."""
    tok = vocab.tokenizer
    special = tokens.special_tokens(tok)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id,
           "eot": special.end_of_turn_id if special.end_of_turn_id != tok.eos_token_id else None}
    for kind, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(tok.bos_token_id is not None and tok.bos_token_id in special.prefix_ids)
    writer.add_add_eos_token(tok.eos_token_id is not None and tok.eos_token_id in special.suffix_ids)
    if isinstance(tok.chat_template, str):
        writer.add_chat_template(tok.chat_template)


# ---------------------------------------------------------------------------------------------
# the weights


def permute_rotary_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Q or K rows (or bias) from HF's rotary layout to llama.cpp's: within each of ``n_head``
    heads of width d, row ``h·d + j·(d/2) + i`` moves to ``h·d + 2i + j`` (halves → pairs), as
    ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` (K is permuted by its own head count,
    the key/value heads under grouped-query attention).

    Args:
        w: (n_head · d, ...) — a projection weight (out, in) or its bias (out,).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class Written:
    """What :func:`write_gguf` wrote."""

    tensors: int
    f16_fallback: int
    """q8_0 matrices written f16 because their rows are not a multiple of :data:`Q8_BLOCK` long."""


def gguf_tensors(model: nn.Module, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float32 tensor) for every weight of ``model`` in state-dict order; the
    output head left out where it is tied to the input embedding (llama.cpp then reuses
    ``token_embd``), Q and K permuted for :data:`PERMUTED` architectures.

    Raises:
        RuntimeError: a weight llama.cpp has no name for (a family wrongly let through).
    """
    import gguf

    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name.startswith("lm_head."):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RuntimeError(f"{hf_name}: no llama.cpp tensor name for it in GGUF architecture {arch}")
        tensor = tensor.detach().float()
        kind = name.split(".")[-2]
        if arch in PERMUTED and kind in heads:
            tensor = permute_rotary_rows(tensor, heads[kind])
        yield name, tensor


def encode(tensor: torch.Tensor, dtype: str):
    """(numpy data, raw GGML type or None) of one float32 tensor in export ``dtype``: 1-D
    tensors float32; matrices float16 (f16), float32 (f32) or Q8_0 blocks (q8_0, where the rows
    are a multiple of :data:`Q8_BLOCK` long, else float16)."""
    from gguf import GGMLQuantizationType, quants

    array = tensor.contiguous().numpy()
    if tensor.ndim < 2 or dtype == "f32":
        return array, None
    if dtype == "q8_0" and tensor.shape[-1] % Q8_BLOCK == 0:
        return quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype("float16"), None


def add_hyperparameters(writer, config, arch: str, rows: int) -> None:
    """The ``<arch>.*`` keys llama.cpp reads: context and embedding length, block count,
    feed-forward length, head counts (key/value heads too), rope base (and for ``llama`` its
    dimension count, the head width), RMS norm epsilon, vocab size; key/value length where a head
    is not hidden / heads wide."""
    _, theta = rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(rows)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))


def write_gguf(out: Path, model: nn.Module, vocab: Vocab, arch: str, dtype: str) -> Written:
    """Write ``model`` (merged, float32) and ``vocab`` as one GGUF file through
    :func:`peftcli.atomic.atomic_file`: a reader, or a kill at any moment, sees the old ``out``
    or the new one whole.

    Raises:
        UserError: a write fault (:func:`peftcli.errors.writing`, naming ``--gguf``).
    """
    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    target = out.resolve()  # a symlinked --gguf: write where it points
    kept = f"--gguf {out} is as it was" if out.exists() else f"nothing was written to {out}"
    count = fallback = 0
    with writing(out, where="--gguf", kept=kept):
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as tmp:
            writer = gguf.GGUFWriter(tmp, arch)
            writer.add_name(f"peft export of {Path(vocab.tokenizer.name_or_path).name or arch}")
            add_hyperparameters(writer, model.config, arch, len(vocab.tokens))
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_vocab(writer, vocab)
            for name, tensor in gguf_tensors(model, arch):
                data, raw = encode(tensor, dtype)
                writer.add_tensor(name, data, raw_dtype=raw)
                count += 1
                fallback += dtype == "q8_0" and tensor.ndim >= 2 and raw is None
            try:
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
    return Written(tensors=count, f16_fallback=fallback)
