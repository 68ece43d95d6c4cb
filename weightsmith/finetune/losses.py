"""Forward passes and losses shared by training, evaluation and the gradient/statistics probes.

We compute losses ourselves instead of passing ``labels=`` to the model so that label smoothing,
MixUp and the response-only mask behave identically for every architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weightsmith.finetune.encoding import IGNORE_INDEX


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def classification_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**model_inputs(batch)).logits.float()


def mixup_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], lam: float, perm: torch.Tensor
) -> torch.Tensor:
    """MixUp for text: interpolate the input (word) embeddings of two examples.

    Position and token-type embeddings are added by the model afterwards, and the union of both
    attention masks is used so neither example's tokens are hidden.
    """
    embed = model.get_input_embeddings()(batch["input_ids"])
    mixed = lam * embed + (1.0 - lam) * embed[perm]
    attention = torch.maximum(batch["attention_mask"], batch["attention_mask"][perm])
    inputs = {"inputs_embeds": mixed, "attention_mask": attention}
    if "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return model(**inputs).logits.float()


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    lam: float = 1.0,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if perm is not None:
        other = F.cross_entropy(logits, labels[perm], label_smoothing=label_smoothing)
        loss = lam * loss + (1.0 - lam) * other
    return loss


def lm_token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over response tokens, and how many response tokens there were."""
    logits = model(**model_inputs(batch)).logits.float()
    targets = batch["labels"][:, 1:]
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    total = F.cross_entropy(
        flat,
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return total, (targets != IGNORE_INDEX).sum()


def batch_loss(
    model: torch.nn.Module,
    task: str,
    batch: dict[str, torch.Tensor],
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean loss of one batch without MixUp (training, gradients)."""
    if task == "classification":
        return classification_loss(classification_logits(model, batch), batch["labels"], label_smoothing)
    total, count = lm_token_losses(model, batch, label_smoothing)
    return total / count.clamp(min=1)
