"""Statistics of a model on data that weight-level methods need.

``feature_norms`` feeds Wanda-style scores (Antidote); ``parameter_gradients`` feeds grafting.
Results are keyed by the names the tensors have in the folder's own safetensors files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from weightsmith.finetune.data import Dataset
from weightsmith.finetune.encoding import IGNORE_INDEX, batches, collate, encode, pad_id
from weightsmith.finetune.evaluation import prepare
from weightsmith.finetune.losses import classification_logits, lm_token_losses
from weightsmith.finetune.modeling import checkpoint_names


@torch.no_grad()
def feature_norms(
    model_dir: str | Path,
    calibration_jsonl: str | Path | Dataset,
    task: str,
    batch_size: int = 16,
    max_length: int = 512,
    truncate: bool = False,
) -> dict[str, torch.Tensor]:
    """L2 norm of each ``nn.Linear``'s input features over all non-padding calibration tokens.

    Forward hooks accumulate sums of squares, so memory stays at one vector per layer however
    large the calibration set. Keys are module names (``...layers.0.self_attn.q_proj``).
    """
    loaded, dataset = prepare(model_dir, calibration_jsonl, task, max_length, truncate, require_head=False)
    model = loaded.model.eval()
    names = checkpoint_names(model, Path(model_dir))
    sumsq: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}  # attention mask of the batch being run

    def hook(name: str):
        def accumulate(module: torch.nn.Linear, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double()
            mask = current["mask"]
            if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x * mask.unsqueeze(-1)  # padding tokens must not count
            sq = x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)
            sumsq[name] = sumsq[name] + sq if name in sumsq else sq

        return accumulate

    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = names.get(f"{module_name}.weight", f"{module_name}.weight")[: -len(".weight")]
            handles.append(module.register_forward_pre_hook(hook(key)))
    try:
        features = encode(dataset, loaded.tokenizer, max_length, truncate)
        for chunk in batches(features, batch_size):
            batch = collate(chunk, pad_id(loaded.tokenizer))
            current["mask"] = batch["attention_mask"].double()
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt().float() for name, s in sumsq.items()}


def parameter_gradients(
    model_dir: str | Path,
    data: str | Path | Dataset,
    task: str,
    batch_size: int = 16,
    max_length: int = 512,
    truncate: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Gradient of the dataset-mean loss w.r.t. every parameter (dropout off).

    The mean is over examples for classification and over response tokens for causal-lm, the
    same quantities the training loss and ``evaluate`` report. Unused parameters get zeros.
    """
    loaded, dataset = prepare(model_dir, data, task, max_length, truncate, require_head=False, seed=seed)
    model = loaded.model.eval()
    names = checkpoint_names(model, Path(model_dir))
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    features = encode(dataset, loaded.tokenizer, max_length, truncate)
    pad = pad_id(loaded.tokenizer)
    if task == "classification":
        denominator = len(features)
    else:  # targets are labels shifted by one, so count from position 1
        denominator = sum(sum(t != IGNORE_INDEX for t in f.labels[1:]) for f in features)  # type: ignore[index]
    denominator = max(denominator, 1)
    for chunk in batches(features, batch_size):
        batch = collate(chunk, pad)
        if task == "classification":
            loss = torch.nn.functional.cross_entropy(
                classification_logits(model, batch), batch["labels"], reduction="sum"
            )
        else:
            loss, _ = lm_token_losses(model, batch)
        (loss / denominator).backward()
    return {
        names.get(n, n): (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }
