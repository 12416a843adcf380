"""The training loss and the padding-free row preparation it runs on.

:func:`supervised_loss_sum` is the fast path (the decoder body, then a blockwise head
cross-entropy at the supervised positions only, padding-free rows with per-example attention);
:mod:`peftcli.guard` checks it against the model's own forward before a run trusts it.
:func:`eval_loss` scores tokenized examples on the path chosen; :func:`make_collate` builds the
micro-batches either path reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftcli import data, models, varlen
from peftcli.data import IGNORE_INDEX

# ---------------------------------------------------------------------------------------------
# the loss


def supervised_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the supervised positions of a batch.

    Runs the transformer body once, then the output head only at positions whose next token is
    supervised (labels != -100): never a full (B, T, vocab) logits tensor.

    Args:
        batch: input_ids, labels and either attention_mask (padded rows, :func:`peftcli.data.collate`)
            or position_ids (padding-free rows, :func:`peftcli.data.collate_padding_free`), each
            (B, T); labels[i] is the target of token i (unshifted, Hugging Face convention).
    Returns:
        (loss_sum, n) — a scalar float32 tensor (nats) and the number of supervised tokens.
    """
    body = models.decoder_body(model)
    # use_cache=False: no KV cache to build, and transformers detects padding-free rows (restarting
    # position_ids, no attention_mask) only when there is no cache
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                  position_ids=batch.get("position_ids"), use_cache=False,
                  **per_example_attention(model, batch)).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    n = int(mask.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = hidden[:, :-1][mask]  # (n, H)
    return head_cross_entropy(model.get_output_embeddings(), h, targets[mask]), n


LOSS_CHUNK = 256  # supervised positions per block of logits: 256 x vocab 49,152 float32 = 48 MiB


def head_cross_entropy(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the output head's logits at the given positions, never holding more
    than :data:`LOSS_CHUNK` positions' logits.

    Args:
        head: the output Linear (vocab, hidden), frozen, no bias, for the chunked path; any other
            head gets the plain formula.
        h: (n, hidden) hidden states; targets: (n,) token ids.
    Returns:
        a float32 scalar (nats). With gradients on, the gradient of h is computed block by block
        in this same pass (:class:`ChunkedHeadCrossEntropy`), so the (n, vocab) logits and their
        gradient never exist at once.
    """
    frozen = isinstance(head, nn.Linear) and head.bias is None and not head.weight.requires_grad
    if not frozen:
        return F.cross_entropy(head(h).float(), targets, reduction="sum")
    if torch.is_grad_enabled() and h.requires_grad:
        return ChunkedHeadCrossEntropy.apply(h, head.weight, targets)
    return sum(F.cross_entropy(F.linear(hc, head.weight).float(), tc, reduction="sum")
               for hc, tc in zip(h.split(LOSS_CHUNK), targets.split(LOSS_CHUNK)))


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(W h_i, t_i) with its gradient in h computed in the forward pass, block by block.

    For a frozen head W (vocab, hidden) the loss's only gradient is dL/dh_i = (softmax(W h_i) -
    onehot(t_i)) W — the same product backward would form from the full logits. Computing it per
    block of :data:`LOSS_CHUNK` positions while the block's logits are at hand keeps at most one
    block of (positions, vocab) float32 logits alive, instead of the logits, their log-softmax and
    their gradient for all n positions (the fused linear cross-entropy of Hsu et al. 2024, Liger
    Kernel). The matmuls run under the caller's autocast like ``F.linear`` would.

    forward(h (n, hidden), weight (vocab, hidden), targets (n,)) -> float32 scalar; backward
    returns dL/dh scaled by the incoming gradient, in h's dtype.
    """

    @staticmethod
    def forward(ctx, h, weight, targets):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        device = h.device.type
        # the head in the matmul dtype once per call (autocast casts a frozen weight at every use:
        # its cast cache keeps only leaves that require grad; this was 2 casts of the (vocab, hidden)
        # weight per step, 8% of a bf16 step of the embedded model)
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w = weight.to(dtype)
        for start in range(0, h.shape[0], LOSS_CHUNK):
            logp, grad_h[start:start + LOSS_CHUNK] = _chunk_logp_and_grad(
                h[start:start + LOSS_CHUNK], targets[start:start + LOSS_CHUNK], w, dtype)
            total += -logp.sum()
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None


def _matmul_dtype(weight: torch.Tensor, device: str) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on, else the weight's."""
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _chunk_logp_and_grad(hc: torch.Tensor, tc: torch.Tensor, w: torch.Tensor, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of the head: (log p(t_i | h_i) (chunk,) float32, d(−log p)/dh_i = (softmax(W h_i) −
    onehot(t_i)) W (chunk, hidden) in ``hc``'s dtype), for ``w`` (vocab, hidden) already in the
    matmul ``dtype``."""
    logits = F.linear(hc.to(dtype), w)  # (chunk, vocab), bf16 under autocast
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(1, tc[:, None])[:, 0]
    grad = logp.exp_()  # softmax
    grad[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
    return token_logp, (grad.to(dtype) @ w).to(hc.dtype)


def head_token_logprobs(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_i | h_i) under the output head, per position, never holding more than
    :data:`LOSS_CHUNK` positions' logits (the per-token form of :func:`head_cross_entropy`, for
    sequence log-probabilities: :mod:`peftcli.preference`).

    Args:
        head: the output Linear (vocab, hidden); a frozen one without bias takes the chunked path,
            any other the plain formula. h: (n, hidden); targets: (n,) token ids.
    Returns:
        (n,) float32 log-probabilities (nats). With gradients on, each position's gradient in h is
        computed block by block in this pass (:class:`ChunkedHeadLogProbs`).
    """
    frozen = isinstance(head, nn.Linear) and head.bias is None and not head.weight.requires_grad
    if not frozen:
        return torch.log_softmax(head(h).float(), dim=-1).gather(1, targets[:, None])[:, 0]
    if torch.is_grad_enabled() and h.requires_grad:
        return ChunkedHeadLogProbs.apply(h, head.weight, targets)
    w = head.weight.to(_matmul_dtype(head.weight, h.device.type))
    return torch.cat([torch.log_softmax(F.linear(hc.to(w.dtype), w).float(), dim=-1).gather(1, tc[:, None])[:, 0]
                      for hc, tc in zip(h.split(LOSS_CHUNK), targets.split(LOSS_CHUNK))])


class ChunkedHeadLogProbs(torch.autograd.Function):
    """log p(t_i | h_i) = log_softmax(W h_i)[t_i] per position, with each position's gradient in h
    computed in the forward pass block by block (as :class:`ChunkedHeadCrossEntropy`): position i's
    log-probability depends on h_i alone, so dL/dh_i = (dL/dlogp_i) · (onehot(t_i) − softmax(W h_i)) W.

    forward(h (n, hidden), weight (vocab, hidden), targets (n,)) -> (n,) float32; backward scales
    the saved per-position gradients by the incoming (n,) gradient.
    """

    @staticmethod
    def forward(ctx, h, weight, targets):
        w = weight.to(_matmul_dtype(weight, h.device.type))
        logps, grads = zip(*(_chunk_logp_and_grad(hc, tc, w, w.dtype)
                             for hc, tc in zip(h.split(LOSS_CHUNK), targets.split(LOSS_CHUNK))))
        ctx.save_for_backward(torch.cat(grads))  # d(-log p)/dh, (n, hidden)
        return torch.cat(logps)

    @staticmethod
    def backward(ctx, grad_logp):
        (neg_grad_h,) = ctx.saved_tensors
        return -neg_grad_h * grad_logp.to(neg_grad_h.dtype)[:, None], None, None


def per_example_attention(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    """The extra keyword arguments the decoder body takes for this batch: ``{"example_bounds":
    [0, n1, n1+n2, ..., N]}`` (:func:`peftcli.varlen.example_bounds`) for one padding-free row
    (``position_ids`` (1, N), no ``attention_mask``) when the model uses :mod:`peftcli.varlen`
    attention (see :func:`prepare_padding_free`), else ``{}``."""
    if batch.get("attention_mask") is not None or batch.get("position_ids") is None:
        return {}
    if getattr(model.config, "_attn_implementation", None) != varlen.NAME:
        return {}
    bounds = varlen.example_bounds(batch["position_ids"])
    return {"example_bounds": bounds} if bounds else {}


def count_supervised(batch: dict[str, torch.Tensor]) -> int:
    """Supervised next-token targets in a batch: labels[:, 1:] != -100."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class SupervisedLoss(nn.Module):
    """The training forward as a module: ``forward(batch) -> (loss_sum, n)`` of ``loss_sum``
    (:func:`supervised_loss_sum`, or the path :func:`peftcli.guard.choose_loss_path` chose).
    Accelerate wraps *this* for data parallelism, so DDP sees the call that uses the trainable
    parameters."""

    def __init__(self, model: nn.Module, loss_sum=supervised_loss_sum):
        super().__init__()
        self.model, self.loss_sum = model, loss_sum

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return self.loss_sum(self.model, batch)


# ---------------------------------------------------------------------------------------------
# padding-free rows


@torch.no_grad()
def keeps_examples_apart(model: nn.Module) -> bool:
    """Whether this model keeps attention within each example of a padding-free row.

    transformers builds the block-diagonal mask from restarting ``position_ids`` in its shared
    mask code; a model class that does not use it would attend across examples. Checked on
    two 3-token sequences: the second one's hidden states, packed after the first, must equal
    those of the sequence alone (to 1e-3, which any cross-example attention far exceeds)."""
    body = models.decoder_body(model)
    was_training = model.training
    model.eval()
    device = model_device(model)
    first, second = torch.tensor([[5, 6, 7]], device=device), torch.tensor([[8, 9, 10]], device=device)
    row = {"input_ids": torch.cat([first, second], 1), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)}
    packed = body(**row, use_cache=False, **per_example_attention(model, row)).last_hidden_state[:, 3:]
    alone = {"input_ids": second, "position_ids": torch.tensor([[0, 1, 2]], device=device)}
    alone = body(**alone, use_cache=False, **per_example_attention(model, alone)).last_hidden_state
    model.train(was_training)
    return bool(torch.allclose(packed.float(), alone.float(), atol=1e-3, rtol=1e-3))


def prepare_padding_free(model: nn.Module) -> bool:
    """Ready a model for padding-free rows; returns whether it can take them.

    A model on transformers' ``sdpa`` attention is switched to per-example attention
    (:mod:`peftcli.varlen`: one causal attention call per example instead of a block-diagonal mask
    over the row); then :func:`keeps_examples_apart` checks that the model really does."""
    varlen.use_varlen_attention(model)
    return keeps_examples_apart(model)


# ---------------------------------------------------------------------------------------------
# micro-batches and evaluation


def make_collate(padding_free: bool, pad_id: int, multiple_of: int = 1):
    """The micro-batch builder: :func:`peftcli.data.collate_padding_free` or right-padded rows
    (:func:`peftcli.data.collate`), lengths rounded up to ``multiple_of``."""
    if padding_free:
        return lambda examples: data.collate_padding_free(examples, multiple_of, pad_id)
    return lambda examples: data.collate(examples, pad_id, multiple_of)


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list[dict], collate, micro_batch_size: int, autocast,
              loss_sum=supervised_loss_sum, advance=None) -> dict:
    """Mean loss per supervised token (nats) and perplexity over tokenized examples.

    ``collate`` builds a micro-batch from a list of examples (see :func:`make_collate`);
    ``loss_sum`` is the loss path (:meth:`peftcli.guard.LossPath.loss_sum`); ``advance(n)``, when
    given, is told each micro-batch's example count as it is done (a progress bar)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), micro_batch_size):
        chunk = examples[i:i + micro_batch_size]
        batch = {k: v.to(model_device(model)) for k, v in collate(chunk).items()}
        with autocast():
            s, k = loss_sum(model, batch)
        total, n = total + float(s), n + k
        if advance is not None:
            advance(len(chunk))
    model.train(was_training)
    loss = total / max(n, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": n}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(p.device for p in model.parameters())
