"""P-tuning: virtual token embeddings produced by a trainable prompt encoder (Liu et al. 2021,
"GPT Understands, Too", §3, https://arxiv.org/abs/2103.10385).

    h_i = encoder(e_i),  i = 1..n            P = [h_1 … h_n] : (n, hidden)
    inputs_embeds ↦ [P ; E(x)]

The base stays frozen; the n prompt inputs e_i (an ``nn.Embedding``) and the encoder train
(§3.2: reparameterising the prompt through an encoder makes the virtual tokens depend on each
other and optimise better than free embeddings). ``encoder: mlp`` — Linear(d, h), ReLU,
Linear(h, h), ReLU, Linear(h, d); ``encoder: lstm`` — a 2-layer bidirectional LSTM (hidden h)
followed by Linear(2h, 2h), ReLU, Linear(2h, d) (the paper's LSTM + MLP head). d is the model's
hidden size, h is ``encoder_hidden_size`` (default d). The modules and their parameter names are
HF peft's ``PromptEncoder`` (``embedding``, ``lstm_head``, ``mlp_head.0`` ...), and so is their
default initialisation (PyTorch's: N(0, 1) for the embedding, Kaiming-uniform for the Linears).

The virtual tokens enter the model through the same hooks as prompt tuning
(:class:`peftcli.methods.prompt_tuning.VirtualTokens`): [virtual][padding][tokens], hidden states
returned for the real positions only.

Files: HF peft saves a P-tuning adapter as the encoder's *output*, one tensor
``prompt_embeddings`` (n, hidden), and so do we; HF peft loads it as a fixed prompt table. Our
files add the encoder's weights under ``prompt_encoder.<HF module path>`` (e.g.
``prompt_encoder.mlp_head.0.weight``), which HF peft ignores: they are what lets a checkpoint
resume training. A file with only ``prompt_embeddings`` (e.g. one HF peft wrote) loads as a fixed
table: right for eval and generate, but the encoder is gone, so training cannot continue from it.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcli.errors import UserError
from peftcli.methods import common
from peftcli.methods.cards.p_tuning import CANNOT_MERGE, PADDING_FREE, PAPER, PEFT_TYPE, SUMMARY, Config, base_quantization  # noqa: F401  (its card)
from peftcli.methods.prompt_tuning import EMBEDDINGS_KEY, attach, check_prompt_learning_config, check_shape, token_dim

ENCODER_PREFIX = "prompt_encoder."  # our extra keys: the encoder weights, for resuming training
LSTM_LAYERS = 2  # HF peft's encoder_num_layers default; an MLP always has the three Linears


class PromptEncoder(nn.Module):
    """The prompt encoder of P-tuning (Liu et al. 2021, §3), with HF peft's architecture and names.

    ``forward()`` -> (n, dim): ``mlp_head(embedding.weight)`` for ``mlp``;
    ``mlp_head(lstm_head(embedding.weight)[0])`` for ``lstm`` (batch of one, squeezed).

    Args:
        n: number of virtual tokens.
        dim: the model's hidden size (input and output width).
        hidden: the encoder's hidden width h.
        kind: ``"mlp"`` or ``"lstm"``.

    After :meth:`fix` the output is a fixed (n, dim) table (``table`` buffer) and no parameter trains.
    """

    def __init__(self, n: int, dim: int, hidden: int, kind: str, device=None):
        super().__init__()
        self.kind = kind
        f32 = {"device": device, "dtype": torch.float32}
        self.embedding = nn.Embedding(n, dim, **f32)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=LSTM_LAYERS, dropout=0.0, bidirectional=True,
                                     batch_first=True, **f32)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **f32), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim, **f32))
        elif kind == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden, **f32), nn.ReLU(),
                                          nn.Linear(hidden, hidden, **f32), nn.ReLU(),
                                          nn.Linear(hidden, dim, **f32))
        else:
            raise ValueError(f"P-tuning encoder must be mlp or lstm, got {kind!r}")
        self.register_buffer("table", None, persistent=False)

    def forward(self) -> torch.Tensor:
        if self.table is not None:
            return self.table
        x = self.embedding.weight.unsqueeze(0)  # (1, n, dim)
        if self.kind == "lstm":
            x = self.lstm_head(x)[0]  # (1, n, 2h)
        return self.mlp_head(x)[0]  # (n, dim)

    @torch.no_grad()
    def fix(self, table: torch.Tensor) -> None:
        """Use ``table`` (n, dim) as the output from now on and freeze the encoder."""
        self.table = table.to(self.embedding.weight.device, torch.float32).clone()
        self.requires_grad_(False)


def apply(model: nn.Module, cfg: Config, tokenizer=None) -> list[str]:
    """Freeze every base parameter, add a :class:`PromptEncoder` as ``model.prompt_encoder`` and
    hook the decoder body (see :class:`peftcli.methods.prompt_tuning.VirtualTokens`). ``tokenizer``
    is not used.

    Returns the hooked module's name. Raises UserError for a model without a decoder body or a
    second prompt method.
    """
    common.freeze_base(model)
    dim = token_dim(model)
    device = model.get_input_embeddings().weight.device
    encoder = PromptEncoder(cfg.num_virtual_tokens, dim, cfg.encoder_hidden_size or dim, cfg.encoder, device=device)
    return attach(model, encoder, cfg.num_virtual_tokens)


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``prompt_embeddings`` (n, hidden): the encoder's output, as HF peft saves it; plus, unless
    the encoder was fixed to a loaded table, its weights as ``prompt_encoder.<name>``."""
    encoder: PromptEncoder = model.prompt_encoder
    with torch.no_grad():
        sd = {EMBEDDINGS_KEY: encoder().detach().float().cpu().contiguous()}
    if encoder.table is None:
        sd.update({ENCODER_PREFIX + k: v.detach().cpu().contiguous() for k, v in encoder.named_parameters()})
    return sd


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load a saved P-tuning adapter: with encoder weights (our files), the encoder itself; with
    ``prompt_embeddings`` alone (HF peft's files), a fixed prompt table (see the module docstring).

    Raises:
        UserError: no ``prompt_embeddings``, an unknown key, an incomplete encoder, or a shape
        that does not fit this model and config.
    """
    encoder: PromptEncoder = model.prompt_encoder
    if EMBEDDINGS_KEY not in sd:
        raise UserError(f"adapter weights do not fit P-tuning: missing {EMBEDDINGS_KEY}")
    check_shape(sd[EMBEDDINGS_KEY], encoder.embedding.weight.shape)
    got = {k.removeprefix(ENCODER_PREFIX): v for k, v in sd.items() if k != EMBEDDINGS_KEY}
    if not got:
        encoder.fix(sd[EMBEDDINGS_KEY])
        return
    want = dict(encoder.named_parameters())
    common.check_keys(got, want, f"this P-tuning encoder (encoder {encoder.kind})", prefix=ENCODER_PREFIX)
    common.copy_weights(want, got, needs="this encoder needs", prefix=ENCODER_PREFIX)


def adapter_config(cfg: Config) -> dict:
    """The HF peft ``PromptEncoderConfig`` fields for ``adapter_config.json`` (without the base
    model). ``encoder_hidden_size`` None means the model's hidden size (HF peft only reads it to
    build a trainable encoder, which loading a saved adapter does not)."""
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "encoder_reparameterization_type": cfg.encoder.upper(),
        "encoder_hidden_size": cfg.encoder_hidden_size,
        "encoder_num_layers": LSTM_LAYERS,
        "encoder_dropout": 0.0,
        "modules_to_save": None,
        "inference_mode": True,
    }


def config_from_adapter(d: dict) -> Config:
    """Our config from an HF peft P_TUNING ``adapter_config.json`` dict. Its file holds only the
    prompt table, so the encoder's shape does not matter for loading.

    Raises:
        UserError: as :func:`peftcli.methods.prompt_tuning.check_prompt_learning_config`, or an
        unknown encoder type.
    """
    check_prompt_learning_config(d)
    kind = str(d.get("encoder_reparameterization_type") or "MLP").lower()
    if kind not in ("mlp", "lstm"):
        raise UserError(f"adapter_config.json: encoder_reparameterization_type {kind.upper()!r} is not MLP or LSTM")
    hidden = d.get("encoder_hidden_size")
    return Config(num_virtual_tokens=d["num_virtual_tokens"], encoder=kind,
                  encoder_hidden_size=hidden if isinstance(hidden, int) and hidden > 0 else None)


file_fields = common.no_file_fields
reads_adapter = common.reads_peft_type(PEFT_TYPE)
lr_groups = common.one_lr_group


def merge(model: nn.Module) -> nn.Module:
    """Not possible (:data:`CANNOT_MERGE`).

    Raises:
        UserError: always, with :data:`CANNOT_MERGE`.
    """
    raise common.refuse_merge("p_tuning", CANNOT_MERGE)
