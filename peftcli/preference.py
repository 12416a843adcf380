"""Preference tuning on (prompt, chosen, rejected) pairs: DPO and ORPO.

A pair is one example of ``format: preference`` (:func:`peftcli.data.tokenize_examples`): the
chosen sequence (``input_ids`` / ``labels``) and the rejected one (``rejected_input_ids`` /
``rejected_labels``), the same prompt tokens first, labels -100 on them. A micro-batch of B pairs
is one right-padded batch of 2B rows, the chosen ones first (:func:`collate_pairs`, as TRL's
concatenated forward), scored in one forward:

    log π(y|x) = Σ_t log p(y_t | x, y_<t)    over the supervised (response + end) tokens
                                              (:func:`sequence_logps`, the blockwise head)

DPO (Rafailov et al. 2023, "Direct Preference Optimization", §4, eq. 7), with the reference
π_ref the same model with its method switched off (:func:`peftcli.methods.off.switched_off`,
under ``torch.no_grad``):

    L_DPO = −log σ(β ((log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))))
    rewards: β (log π(y) − log π_ref(y))

ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
§4, eq. 6-7), no reference model, with the length-averaged log-probabilities
P̄(y) = exp((1/|y|) log π(y)):

    odds(y) = P̄(y) / (1 − P̄(y))
    L_ORPO = L_NLL(y_c) + λ · (−log σ(log (odds(y_c) / odds(y_r))))
    rewards: β log P̄(y) with β = λ (as TRL's ORPOTrainer logs them)

Over an optimizer step of N pairs in several micro-batches, the step's loss is the mean over its
N pairs (DPO; ORPO's odds-ratio term), and ORPO's NLL is the mean over the step's chosen
supervised tokens, as the sft loss and TRL's (per batch) cross-entropy: a split into
micro-batches changes no gradient (:func:`accumulate`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftcli import data, models
from peftcli.data import IGNORE_INDEX
from peftcli.loss import head_token_logprobs, model_device
from peftcli.methods.off import switched_off

OBJECTIVES = ("dpo", "orpo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")


# ---------------------------------------------------------------------------------------------
# micro-batches and sequence log-probabilities


def collate_pairs(examples: list[dict], pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """B preference examples as one right-padded batch (:func:`peftcli.data.collate`) of 2B rows:
    rows 0..B-1 the chosen sequences, rows B..2B-1 the rejected ones, in the same order.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``, each (2B, T) long.
    """
    chosen = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    rejected = [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples]
    return data.collate(chosen + rejected, pad_id, multiple_of)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], own_forward: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's supervised tokens.

    Args:
        batch: right-padded rows (input_ids, attention_mask, labels (R, T); labels unshifted, -100
            not scored).
        own_forward: score with the model's own forward and logits (the ``reference`` loss path,
            :mod:`peftcli.guard`, for families whose logits are not ``lm_head(body(x))``; holds the
            (R, T, vocab) logits); else the decoder body then the output head at the supervised
            positions only, block by block (:func:`peftcli.loss.head_token_logprobs`), never the
            full logits.
    Returns:
        (logps (R,) float32 nats, tokens (R,) long: the supervised tokens of each row).
    """
    targets = batch["labels"][:, 1:]  # (R, T-1)
    mask = targets != IGNORE_INDEX
    tokens = mask.sum(dim=1)
    if own_forward:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
        return (logp * mask).sum(dim=1), tokens
    body = models.decoder_body(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False).last_hidden_state  # (R, T, H)
    token_logp = head_token_logprobs(model.get_output_embeddings(), hidden[:, :-1][mask], targets[mask])  # (n,)
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (n,) row of each token
    return torch.zeros(mask.shape[0], device=token_logp.device).index_add(0, rows, token_logp), tokens


# ---------------------------------------------------------------------------------------------
# the losses


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, §4, eq. 7) per pair: −log σ(β((π_c − ref_c) − (π_r − ref_r))).

    Args:
        chosen, rejected: the policy's sequence log-probabilities (B,); ref_chosen, ref_rejected:
            the reference's (B,); beta: β > 0.
    Returns:
        (losses (B,), chosen rewards β(π_c − ref_c) (B,), rejected rewards β(π_r − ref_r) (B,));
        the rewards detached.
    """
    logits = (chosen - ref_chosen) - (rejected - ref_rejected)
    losses = -F.logsigmoid(beta * logits)
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def orpo_log_odds(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """log(odds(y_c) / odds(y_r)) (Hong et al. 2024, §4, eq. 7) from the length-averaged
    log-probabilities (B,) (each < 0): log odds(y) = log P̄ − log(1 − P̄), 1 − P̄ as −expm1(log P̄)."""
    log_odds = lambda m: m - torch.log(-torch.expm1(m))  # noqa: E731
    return log_odds(chosen_mean) - log_odds(rejected_mean)


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, lam: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term per pair, weighted (Hong et al. 2024, eq. 6-7): λ · (−log σ(log odds ratio)).

    Args:
        chosen_mean, rejected_mean: length-averaged log-probabilities (B,); lam: λ > 0.
    Returns:
        (weighted odds-ratio losses (B,), chosen rewards λ · chosen_mean (B,), rejected rewards
        λ · rejected_mean (B,), log odds ratios (B,)); all but the losses detached.
    """
    log_odds = orpo_log_odds(chosen_mean, rejected_mean)
    return (-lam * F.logsigmoid(log_odds), lam * chosen_mean.detach(), lam * rejected_mean.detach(),
            log_odds.detach())


@dataclass
class PairTotals:
    """A micro-batch's (or a step's, or an eval's) sums, added with ``+``: ``pairs``; ``pair_loss``
    (DPO's losses, or ORPO's weighted odds-ratio terms) and, for ORPO, ``nll_sum`` over
    ``chosen_tokens``, which :meth:`mean_loss` turns into the step's loss; the reward sums and the
    count of pairs whose chosen reward is above the rejected one (``correct``) and of those whose
    chosen sequence is more likely than the rejected one (``prefers_chosen``, defined for any
    model, the base too)."""

    pairs: int = 0
    pair_loss: float = 0.0  # DPO losses, or ORPO's weighted odds-ratio terms, summed over pairs
    nll_sum: float = 0.0  # ORPO: the chosen tokens' summed NLL
    chosen_tokens: int = 0
    chosen_reward: float = 0.0
    rejected_reward: float = 0.0
    correct: int = 0
    log_odds: float = 0.0  # ORPO: summed log odds ratios
    prefers_chosen: int = 0  # pairs with log π(y_c) > log π(y_r): the model itself ranks them right

    def __add__(self, other: PairTotals) -> PairTotals:
        return PairTotals(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    def mean_loss(self, objective: str) -> float:
        """The loss as the step reports it: mean over pairs (+ ORPO's NLL per chosen token)."""
        loss = self.pair_loss / max(self.pairs, 1)
        return loss + (self.nll_sum / max(self.chosen_tokens, 1) if objective == "orpo" else 0.0)

    def metrics(self, objective: str, prefix: str = "") -> dict[str, float]:
        """``{loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracy}`` as means
        over the pairs (ORPO adds ``nll_loss`` and ``log_odds_ratio``), keys after ``prefix``."""
        n = max(self.pairs, 1)
        out = {"loss": self.mean_loss(objective), "rewards/chosen": self.chosen_reward / n,
               "rewards/rejected": self.rejected_reward / n,
               "rewards/margins": (self.chosen_reward - self.rejected_reward) / n, "rewards/accuracy": self.correct / n}
        if objective == "orpo":
            out.update({"nll_loss": self.nll_sum / max(self.chosen_tokens, 1), "log_odds_ratio": self.log_odds / n})
        return {prefix + k: v for k, v in out.items()}


def chosen_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The supervised tokens of a pair batch's chosen rows (the first half, :func:`collate_pairs`)."""
    half = batch["labels"].shape[0] // 2
    return int((batch["labels"][:half, 1:] != IGNORE_INDEX).sum())


class PreferenceLoss(nn.Module):
    """The preference forward as a module (accelerate wraps *this* for data parallelism, as
    :class:`peftcli.loss.SupervisedLoss`).

    ``forward(batch, pairs_step, chosen_tokens_step) -> (loss, totals)``: ``batch`` from
    :func:`collate_pairs`; ``loss`` a float32 scalar with gradient, this micro-batch's share of
    the step's loss (its pair losses over ``pairs_step``, ORPO's chosen NLL over
    ``chosen_tokens_step``), so the shares of a step's micro-batches add up to the step's loss;
    ``totals``: :class:`PairTotals` of the micro-batch.

    Args:
        model: the adapted model; objective: ``dpo`` | ``orpo``; beta: DPO's β; orpo_lambda: ORPO's
            λ; own_forward: score with the model's own logits (:func:`sequence_logps`).
    """

    def __init__(self, model: nn.Module, objective: str, beta: float = 0.1, orpo_lambda: float = 0.1,
                 own_forward: bool = False):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.model, self.objective, self.beta, self.orpo_lambda = model, objective, beta, orpo_lambda
        self.own_forward = own_forward

    def forward(self, batch: dict[str, torch.Tensor], pairs_step: int, chosen_tokens_step: int
                ) -> tuple[torch.Tensor, PairTotals]:
        half = batch["input_ids"].shape[0] // 2
        logps, tokens = sequence_logps(self.model, batch, self.own_forward)  # (2B,)
        chosen, rejected = logps[:half], logps[half:]
        if self.objective == "dpo":
            with torch.no_grad(), switched_off(self.model):
                ref, _ = sequence_logps(self.model, batch, self.own_forward)
            losses, r_c, r_r = dpo_loss(chosen, rejected, ref[:half], ref[half:], self.beta)
            loss, nll, n_chosen, log_odds = losses.sum() / max(pairs_step, 1), 0.0, 0, 0.0
        else:
            n = tokens.clamp(min=1).to(logps.dtype)
            losses, r_c, r_r, odds = orpo_loss(chosen / n[:half], rejected / n[half:], self.orpo_lambda)
            nll_sum = -chosen.sum()
            loss = losses.sum() / max(pairs_step, 1) + nll_sum / max(chosen_tokens_step, 1)
            nll, n_chosen, log_odds = float(nll_sum.detach()), int(tokens[:half].sum()), float(odds.sum())
        totals = PairTotals(pairs=half, pair_loss=float(losses.detach().sum()), nll_sum=nll, chosen_tokens=n_chosen,
                            chosen_reward=float(r_c.sum()), rejected_reward=float(r_r.sum()),
                            correct=int((r_c > r_r).sum()), log_odds=log_odds,
                            prefers_chosen=int((chosen > rejected).sum()))
        return loss, totals


def loss_for(model: nn.Module, train, own_forward: bool = False) -> PreferenceLoss:
    """The :class:`PreferenceLoss` of a recipe's ``train`` section (its objective, beta, orpo_lambda)."""
    return PreferenceLoss(model, train.objective, train.beta, train.orpo_lambda, own_forward)


# ---------------------------------------------------------------------------------------------
# a step and an eval


def accumulate(loss_fn: nn.Module, micro_batches: list[dict], device, autocast=nullcontext,
               backward=torch.Tensor.backward, accelerator=None) -> PairTotals:
    """Forward and backward over the pair micro-batches of one optimizer step: each micro-batch's
    share of the step's loss (:class:`PreferenceLoss`) over the step's pair and chosen-token
    counts (over all processes), so the gradient is that of the step's mean over its pairs,
    however the pairs are split. With several processes the counts and totals are summed across
    them and DDP's averaging is undone (as :func:`peftcli.trainer.accumulate_gradients`).

    Returns:
        the step's :class:`PairTotals` (all processes).
    """
    world = accelerator.num_processes if accelerator is not None else 1
    counts = torch.tensor([sum(mb["input_ids"].shape[0] // 2 for mb in micro_batches),
                           sum(chosen_tokens(mb) for mb in micro_batches)])
    if world > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), "sum").cpu()
    pairs, n_tokens = int(counts[0]), int(counts[1])
    totals = PairTotals()
    for i, mb in enumerate(micro_batches):
        mb = {k: v.to(device) for k, v in mb.items()}
        sync = nullcontext() if world == 1 or i == len(micro_batches) - 1 else accelerator.no_sync(loss_fn)
        with sync:
            with autocast():
                loss, part = loss_fn(mb, pairs, n_tokens)
            backward(loss * world)
        totals = totals + part
    if world > 1:
        from accelerate.utils import gather_object

        totals = sum(gather_object([totals]), PairTotals())
    return totals


@torch.no_grad()
def eval_preference(loss_fn: PreferenceLoss, examples: list[dict], collate, micro_batch_size: int, autocast=nullcontext,
                    advance=None, method_off: bool = False) -> dict[str, float]:
    """Held-out preference metrics over pair examples, the model in eval mode: ``eval_loss`` (the
    objective's loss, as :meth:`PairTotals.mean_loss`), ``eval_accuracy`` (the fraction of pairs
    whose chosen reward is above the rejected one, TRL's ``rewards/accuracies``), ``eval_margin``
    (mean chosen − rejected reward), ``eval_logp_accuracy`` (the fraction of pairs whose chosen
    sequence the model finds more likely: log π(y_c) > log π(y_r)), ``eval_pairs``.

    ``method_off``: score the base (:func:`peftcli.methods.off.switched_off`); its DPO rewards are
    0 by definition (policy = reference), so its ``eval_logp_accuracy`` is the number to compare.
    ``advance(n)`` is told each micro-batch's pair count (a progress bar)."""
    model = loss_fn.model
    was_training = model.training
    model.eval()
    totals = PairTotals()
    with switched_off(model) if method_off else nullcontext():
        for i in range(0, len(examples), micro_batch_size):
            chunk = examples[i:i + micro_batch_size]
            batch = {k: v.to(model_device(model)) for k, v in collate(chunk).items()}
            with autocast():
                _, part = loss_fn(batch, len(chunk), chosen_tokens(batch))
            totals = totals + part
            if advance is not None:
                advance(len(chunk))
    model.train(was_training)
    m = totals.metrics(loss_fn.objective)
    return {"eval_loss": m["loss"], "eval_accuracy": m["rewards/accuracy"], "eval_margin": m["rewards/margins"],
            "eval_logp_accuracy": totals.prefers_chosen / max(totals.pairs, 1), "eval_pairs": totals.pairs}
