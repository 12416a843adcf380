"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023, "NEFTune:
Noisy Embeddings Improve Instruction Finetuning", Algorithm 1, https://arxiv.org/abs/2310.05914).

    X_emb ↦ X_emb + (alpha / √(L·d)) · ε,        ε ~ U(-1, 1) per element, drawn every forward

with d the embedding width and L the sequence length, so every element of the noise is at most
alpha/√(L·d) in size. **L is each example's own token count.** The paper's rows are one padded
example each; HF's and TRL's hooks take L as the (padded) row length, which makes the noise an
example gets depend on the others in its micro-batch (the longest sets the padding), and, in a
padding-free row of several concatenated examples, shrink with how many share the row. Taking
every example's own length gives each example the scale Algorithm 1 gives it alone, and the same
scale on every loss path (padded or padding-free rows, packed or not). Padding positions get no
noise (they are masked); in a padding-free row the examples are the runs of ``position_ids``
that start at 0 (:func:`example_lengths`).

Only the training forward is noisy: :class:`NEFTune` hooks the model's input embedding and
adds the noise only inside a call of the training loss module (which tells it the micro-batch's
layout) with the embedding in training mode; evaluation, generation and the loss-path check see
the plain embeddings. Prompt methods embed the real tokens with that same module and prepend
their virtual tokens after it, so the virtual tokens get no noise and L counts the real tokens
only. The noise is drawn from torch's global generator (seeded by ``train.seed``; its state is in
every checkpoint, so a resumed run draws what the uninterrupted one would).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def example_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The token count of the example each position belongs to, (B, T) long, 0 on padding.

    Args:
        batch: a collated micro-batch: right-padded rows (``attention_mask`` (B, T), 1 on real
            tokens) or padding-free rows (``position_ids`` (B, T), restarting at 0 for each
            example; a filler segment counts as an example of its own); with neither, each row
            is one example.
    """
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum(1, keepdim=True) * (mask != 0)
    ids = batch["input_ids"]
    positions = batch.get("position_ids")
    if positions is None:
        return torch.full_like(ids, ids.shape[1])
    segment = (positions == 0).cumsum(1)  # (B, T): 1, 1, 1, 2, 2, ... per row
    segment = segment + torch.arange(ids.shape[0], device=ids.device)[:, None] * (ids.shape[1] + 1)  # unique over rows
    _, inverse, counts = torch.unique(segment, return_inverse=True, return_counts=True)
    return counts[inverse]


def noise(embeds: torch.Tensor, lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """NEFTune's noise for ``embeds`` (B, T, d): ε · alpha/√(L·d), ε ~ U(-1, 1) from torch's
    global generator (float32), L = ``lengths`` (B, T) per position, zero where L is 0.
    Returns (B, T, d) in ``embeds``' dtype."""
    d = embeds.shape[-1]
    scale = alpha / torch.sqrt(lengths.clamp(min=1).float() * d) * (lengths > 0)  # (B, T)
    eps = torch.rand(embeds.shape, device=embeds.device, dtype=torch.float32) * 2 - 1  # U[-1, 1)
    return (eps * scale.unsqueeze(-1)).to(embeds.dtype)


class NEFTune:
    """The hooks that make a training forward noisy (see the module docstring).

    :meth:`attach` hooks ``loss_module`` (called ``loss_module(batch)``: it notes the batch's
    :func:`example_lengths` for the duration of the call) and ``embedding`` (the model's input
    embedding: its output ``(B, T, d)`` gets :func:`noise` added when a batch is noted and the
    embedding is in training mode). :meth:`detach` removes them.

    Args:
        alpha: the noise scale α (the paper tries 5, 10 and 15).
    Raises (from the hooked forward):
        RuntimeError: the embedding's output is not of the noted batch's (B, T) (a model that
            embeds something else inside the loss call): the noise would not fit its examples.
    """

    def __init__(self, alpha: float):
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"NEFTune alpha must be a positive number, got {alpha}")
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None  # (B, T) of the batch in the loss call now running
        self._handles: list = []

    def attach(self, loss_module: nn.Module, embedding: nn.Module) -> NEFTune:
        self._handles = [loss_module.register_forward_pre_hook(self._note),
                         loss_module.register_forward_hook(self._forget, always_call=True),
                         embedding.register_forward_hook(self._add_noise)]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.lengths = [], None

    def _note(self, module: nn.Module, args: tuple) -> None:
        self.lengths = example_lengths(args[0])

    def _forget(self, module: nn.Module, args: tuple, output) -> None:
        self.lengths = None

    def _add_noise(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if self.lengths is None or not module.training:
            return None  # not the training forward: the embeddings as they are
        if tuple(output.shape[:2]) != tuple(self.lengths.shape):
            raise RuntimeError(f"NEFTune: the input embedding returned {tuple(output.shape)} inside a training "
                               f"batch of {tuple(self.lengths.shape)} tokens; cannot match the noise to its examples")
        return output + noise(output, self.lengths.to(output.device), self.alpha)
