"""Precision chosen per machine: ``model.dtype: auto`` and ``train.mixed_precision: auto``.

:func:`choose` turns the two recipe keys into a :class:`Precision`: the frozen base's dtype (for
a 4/8-bit base: its compute dtype), the autocast dtype, and a one-line reason the banner prints.
Trainable method weights stay float32 whatever is chosen (each method keeps them so).

``auto`` picks what is fastest and safe on the device the model runs on:

    CPU with bf16 units (AVX512-BF16 or AMX)  -> bf16 autocast
    CPU without them (e.g. AVX2 only)         -> float32, no autocast
    CUDA with bf16                            -> bf16 autocast
    CUDA without bf16                         -> fp16 autocast

and the base's dtype under it: a full-precision base stays float32 (autocast runs its matmuls
in bf16/fp16; the residual stream, norms and softmax stay float32), except that for training
under bf16 autocast its frozen Linear weights are stored in bfloat16
(:func:`peftcli.models.store_linear_weights`): autocast would cast them to bf16 at every matmul
anyway (its cast cache keeps only weights that require grad), which was ~10% of a step of the
embedded model, so the matmuls are bit for bit the same, with half their weight memory; a 4/8-bit
base computes in bfloat16 under bf16 autocast, else float32. A bfloat16 full-precision base saves memory but
rounds the residual stream too, and on the embedded model that moved the padding-free loss path
2.9e-2 nats from the model's own forward on alpaca rows (beyond bf16's 2e-2 tolerance), so the
check fell back to slower padded rows; set ``model.dtype: bfloat16`` to choose it anyway.

On a CPU without bf16 units bfloat16 is emulated: an optimizer step of HF peft + Trainer with
``bf16=True`` took 10-17x as long as in float32 on an AVX2-only AMD EPYC (issue 18). Where the
CPU has the units, bf16 matmuls run at about twice float32's speed. A setting other than
``auto`` is used as written; bf16 set explicitly on a CPU without the units gets a one-line
warning (:attr:`Precision.warning`), not an error.

The CPU answer is read from the CPU itself, nothing is measured or cached: oneDNN's own check
(``torch.ops.mkldnn._is_mkldnn_bf16_supported``, the one its bf16 kernels dispatch on) decides,
and ``/proc/cpuinfo``'s flags (``avx512_bf16``, ``amx_bf16``, ...) name the reason.
``PEFTCLI_CPU_BF16=0`` or ``=1`` forces the CPU answer (``0`` makes a CPU with bf16 units
choose as an AVX2-only one does, e.g. to reproduce that machine's settings).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from peftcli.errors import UserError

ENV = "PEFTCLI_CPU_BF16"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.mixed_precision -> autocast dtype
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # the flags a bench records
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of native bf16 matmuls
SLOW = "bf16 is emulated there (10-17x slower than float32 on an AVX2-only EPYC)"  # the warning's measured cost


@dataclass(frozen=True)
class Precision:
    """What a run computes in (:func:`choose`).

    ``dtype``: the frozen base's weights, ``float32 | bfloat16 | float16`` (a 4/8-bit base: its
    compute dtype, and the dtype of its unquantised modules); ``autocast``: ``no | bf16 | fp16``;
    ``reason``: why, one line (``auto: this CPU has avx512_bf16``); ``warning``: one line when an
    explicit setting is slow here, else None; ``quantization``: the base's, for :meth:`describe`;
    ``linear_dtype``: the dtype the frozen base's Linear weights are stored in for training when
    it is not ``dtype`` (``bfloat16`` under bf16 autocast with ``model.dtype: auto``, see
    :func:`choose`), else None.
    """

    dtype: str
    autocast: str
    reason: str
    warning: str | None = None
    quantization: str = "none"
    linear_dtype: str | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The ``torch.autocast`` dtype, None for no autocast."""
        return AUTOCAST_DTYPES.get(self.autocast)

    def describe(self, autocast: bool = True) -> str:
        """``precision: base bfloat16, autocast bf16 (auto: this CPU has avx512_bf16)``; with
        ``autocast=False`` (eval and generation, which do not autocast) the base part only."""
        base = self.dtype if self.quantization == "none" else f"{self.quantization} (compute {self.dtype})"
        if self.linear_dtype and autocast:
            base += f" (linear weights {self.linear_dtype})"
        cast = ("no autocast" if self.autocast == "no" else f"autocast {self.autocast}") if autocast else ""
        return f"precision: base {base}{', ' * bool(cast)}{cast} ({self.reason})"

    def lines(self, autocast: bool = True) -> list[str]:
        """What a banner prints: :meth:`describe`, then the warning if there is one."""
        return [self.describe(autocast)] + ([self.warning] if self.warning else [])

    def as_json(self) -> dict:
        """``{"dtype", "mixed_precision", "reason", "warning", "linear_dtype"}`` for summary.json."""
        d = asdict(self)
        return {"dtype": d["dtype"], "mixed_precision": d["autocast"], "reason": d["reason"], "warning": d["warning"],
                "linear_dtype": d["linear_dtype"]}


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(the CPU's model name, its flags) from ``/proc/cpuinfo``; ("", empty) where there is none."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


def cpu_has_bf16_units() -> bool:
    """True when oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 / AMX), ignoring
    :data:`ENV`."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _units(native: bool) -> str:
    """What this CPU has: ``avx512_bf16`` / ``no bf16 units (AVX2 only)``."""
    flags = cpu_info()[1]
    if native:
        named = [f for f in BF16_FLAGS if f in flags]
        return ", ".join(named) if named else "bf16 units (oneDNN says so)"
    vector = "AVX-512 without BF16" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else None
    return "no bf16 units" + (f" ({vector})" if vector else "")


def cpu_bf16() -> tuple[bool, str]:
    """(whether to treat this CPU as having bf16 units, why in words: ``this CPU has
    avx512_bf16``), :data:`ENV` first.

    Raises:
        UserError: :data:`ENV` set to something other than 0 or 1.
    """
    forced = os.environ.get(ENV, "")
    if forced not in ("", "0", "1"):
        raise UserError(f"{ENV}={forced}: set it to 1 (this CPU has bf16 units), 0 (it has none), or unset it")
    native = cpu_has_bf16_units()
    if forced:
        return forced == "1", (f"{ENV}={forced} treats this CPU as one {'with' if forced == '1' else 'without'} "
                               f"bf16 units (it has {_units(native)})")
    return native, f"this CPU has {_units(native)}"


def default_device() -> str:
    """Where a run trains: ``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _auto(device: str) -> tuple[str, str]:
    """(the autocast ``auto`` picks on ``device``, the reason in words)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{name} supports bf16"
        return "fp16", f"{name} has no bf16"
    native, why = cpu_bf16()
    if native:
        return "bf16", why
    return "no", why if os.environ.get(ENV) else f"{why}, where bf16 is emulated and slow"


def choose(dtype: str = "auto", mixed_precision: str = "auto", device: str | None = None,
           quantization: str = "none") -> Precision:
    """Resolve ``model.dtype`` and ``train.mixed_precision`` for ``device`` (default
    :func:`default_device`).

    ``mixed_precision: auto`` picks the device's autocast (module docstring); ``dtype: auto`` is
    float32 for a full-precision base, and for a 4/8-bit base follows the autocast: bfloat16 under
    bf16 autocast, else float32. A set value is kept as is.

    Args:
        dtype: ``auto | float32 | bfloat16 | float16``.
        mixed_precision: ``auto | no | bf16 | fp16``.
        device: ``cpu`` or ``cuda``; where the model computes.
        quantization: the base's (``none | nf4 | fp4 | int8``): whether ``dtype: auto`` may be
            bfloat16, and for :meth:`Precision.describe`.
    Raises:
        UserError: :data:`ENV` set to something other than 0 or 1.
    """
    device = device or default_device()
    autocast, why = _auto(device) if mixed_precision == "auto" else (mixed_precision, "")
    quantized_bf16 = autocast == "bf16" and quantization != "none"  # a 4/8-bit base's compute dtype
    chosen = dtype if dtype != "auto" else "bfloat16" if quantized_bf16 else "float32"
    # under bf16 autocast every matmul casts a frozen float32 weight to bf16 again (autocast's cast
    # cache keeps only leaves that require grad): stored so once, the matmuls are the same
    linear = "bfloat16" if dtype == "auto" and autocast == "bf16" and quantization == "none" else None
    if mixed_precision != "auto":
        reason = "as set in the recipe" if dtype != "auto" else f"model.dtype auto follows train.mixed_precision {autocast}"
    else:
        reason = f"auto: {why}" if dtype == "auto" else f"model.dtype as set; mixed_precision auto: {why}"
    return Precision(chosen, autocast, reason, _slow_warning(dtype, mixed_precision, device), quantization, linear)


def _slow_warning(dtype: str, mixed_precision: str, device: str) -> str | None:
    """One line when bf16 is set explicitly on a CPU without bf16 units; else None."""
    keys = [k for k, v in (("model.dtype: bfloat16", dtype == "bfloat16"), ("train.mixed_precision: bf16", mixed_precision == "bf16")) if v]
    if device != "cpu" or not keys:
        return None
    native, why = cpu_bf16()
    if native:
        return None
    return (f"warning: {' and '.join(keys)}, but {why}: {SLOW}; "
            "auto (the default) picks float32 here")
