"""Independent reference implementations for the sparse-merge tests (written from the papers'
and mergekit's documented semantics, in matrix form over whole tensors or whole models; they
share no code with weightsmith.ops)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from weightsmith.pipeline import merge


def merge_to_state(recipe: dict[str, Any], out: Path, **kw: Any) -> dict[str, torch.Tensor]:
    from models import load_folder

    result = merge(recipe, out, overwrite=True, **kw)
    return load_folder(result.out)


def recipe(method: str, base: Path, models: list[Path], params: dict[str, Any] | None = None,
           model_params: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    entries = []
    for i, m in enumerate(models):
        entry: dict[str, Any] = {"model": str(m)}
        if model_params is not None:
            entry["parameters"] = model_params[i]
        entries.append(entry)
    return {"merge_method": method, "base_model": str(base), "models": entries,
            "parameters": params or {}, **extra}


def ties_paper_reference(base: dict[str, torch.Tensor], fts: list[dict[str, torch.Tensor]],
                         density: float, lam: float = 1.0, aggregation: str = "dis-mean",
                         skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """TIES as the reference code does it: flatten every float tensor (sorted keys, ``skip``
    removed as tied duplicates), global top-k per task, mass sign with majority fallback,
    disjoint aggregation, unflatten. Returns float32 tensors for every flattened key."""
    keys = sorted(k for k, v in base.items() if v.dtype.is_floating_point and k not in skip)
    flat_base = torch.cat([base[k].float().reshape(-1) for k in keys])
    tv = torch.stack([torch.cat([ft[k].float().reshape(-1) for k in keys]) - flat_base for ft in fts])
    d = tv.shape[1]
    if density < 1:
        m = d - int(d * density)
        kth = tv.abs().kthvalue(m, dim=1, keepdim=True).values
        tv = tv * (tv.abs() >= kth)
    sign = torch.sign(tv.sum(dim=0))
    majority = torch.sign(sign.sum())
    sign[sign == 0] = majority
    keep = torch.where(sign.unsqueeze(0) > 0, tv > 0, tv < 0)
    sel = tv * keep
    if aggregation == "dis-mean":
        merged = sel.sum(0) / (sel != 0).sum(0).float().clamp(min=1)
    elif aggregation == "dis-sum":
        merged = sel.sum(0)
    else:
        merged = sel.abs().max(0).values * sign
    flat = flat_base + lam * merged
    out, at = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = flat[at:at + n].reshape(base[k].shape)
        at += n
    return out


def mergekit_ties_tensor(base: torch.Tensor, fts: list[torch.Tensor], density: list[float],
                         weight: list[float], lam: float = 1.0, normalize: bool = True,
                         exact_k: bool = True) -> torch.Tensor:
    """mergekit's per-tensor TIES in float32: exactly k = max(1, floor(density n)) kept by a
    full sort (``exact_k``), or every entry >= the k-th largest magnitude (weightsmith's rule)."""
    deltas = []
    for ft, dens in zip(fts, density):
        delta = (ft.float() - base.float()).reshape(-1)
        if dens < 1:
            k = max(1, int(dens * delta.numel()))
            mask = torch.zeros_like(delta)
            if exact_k:
                mask[torch.argsort(delta.abs(), descending=True)[:k]] = 1
            else:
                mask = (delta.abs() >= delta.abs().sort(descending=True).values[k - 1]).float()
            delta = delta * mask
        deltas.append(delta)
    w = torch.tensor(weight).unsqueeze(1)
    weighted = torch.stack(deltas) * w
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted.sign() == sign
    mixed = (weighted * agree).sum(0)
    if normalize:
        div = (w * agree).sum(0)
        div[div == 0] = 1
        mixed = mixed / div
    return (base.float().reshape(-1) + lam * mixed).reshape(base.shape)


def kept_band_sorted(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's breadcrumbs mask by sorted position (no ties in the tests that use it)."""
    n = x.numel()
    keep = int(density * n)
    bot = max(0, n - keep - int(gamma * n))
    mask = torch.zeros(n)
    mask[torch.argsort(x.abs().reshape(-1))[bot:bot + keep]] = 1
    return mask.reshape(x.shape)


def whole_tensor_budget(rec: dict, **options: Any) -> int:
    """A memory budget under which the method's tensors do not fit the row units (so each one
    gets a one-off whole-tensor buffer) but the merge is still within budget, so not refused."""
    from weightsmith.engine.tasks import budget_that_fits
    from weightsmith.pipeline import plan_merge

    budget = budget_that_fits(plan_merge(rec, memory_budget="4KB", **options))
    assert plan_merge(rec, memory_budget=budget, **options).oversize
    return budget
