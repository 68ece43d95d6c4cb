"""RAM: Reinforced Agent Merging. Average task-vector entries where several models changed the
weight, keep them whole where only one did; RAM+ (tensor-local) boosts each model's unique
entries by how much it shares.

"Reinforced Agent Merging", arXiv 2601.13572; mergekit's ``ram`` and ``ramplus_tl`` (0.1.5)
define the recipe surface and rules followed here. Per tensor, delta_i = theta_i - theta_0;
model i is active at a coordinate where |delta_i| > ``epsilon`` (default 1e-5; inactive entries
are dropped, even if non-zero); c = the number of active models there.

* ``ram``: theta = theta_0 + sum_i [active_i] delta_i / max(c, 1): entries only one model
  changed are added as they are (c = 1), shared ones averaged over the models that changed
  them. Elementwise.
* ``ramplus_tl``: per model, S_i = its active coordinates with c > 1, U_i = those with c = 1,
  rho_i = S_i / max(U_i, epsilon), lambda_i = 1 + r clamp(rho_i, 0, alpha) (``r`` 0.1,
  ``alpha`` 0.2); unique entries are multiplied by lambda_i, shared ones averaged as in ram.
  The counts are per tensor ("tensor-local"), so it takes whole tensors.

Operation order and float32 arithmetic are mergekit's (lambda_i computed as a float32 tensor).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register


def _ram(
    inputs: MergeInputs, *, plus: bool, epsilon: float = 1e-5, r: float = 0.1, alpha: float = 0.2
) -> torch.Tensor:
    assert inputs.base is not None
    base = inputs.base
    delta = inputs.models.sub_(base.unsqueeze(0))  # in place: the engine hands the stack over
    n = delta.shape[0]
    # Per model, to keep the scratch at a few bytes per coordinate: the active masks (1 byte per
    # model) and the count (float32: exact for any number of models).
    active = [delta[i].abs() > epsilon for i in range(n)]
    count = torch.zeros_like(base)
    for a in active:
        count.add_(a)
    unique = count == 1
    scales = [1.0] * n
    if plus:
        shared = count > 1
        shared_n = torch.stack([(a & shared).sum() for a in active])
        unique_n = torch.stack([(a & unique).sum() for a in active])
        del shared
        # float32 like mergekit's tensor arithmetic: rho = shared / max(unique, eps)
        rho = shared_n.to(torch.float32) / unique_n.to(torch.float32).clamp(min=epsilon)
        lam = rho.clamp(min=0, max=alpha).mul(r).add(1)
        scales = [float(v) for v in lam]
        inputs.stats["unique_boost_sum"] = float(lam.sum())
    divisor = count.clamp_(min=1)  # unique entries: 1, so term / divisor is the term itself
    out = inputs.output_buffer().zero_()
    for i in range(n):
        term = delta[i].mul_(active[i])  # inactive entries are dropped
        if scales[i] != 1.0:
            # unique entries times lambda_i, shared ones over the count
            boost = torch.where(unique, scales[i], 1.0).to(term.dtype)
            term.mul_(boost).div_(torch.where(unique, 1.0, divisor))
        else:
            term.div_(divisor)
        out.add_(term)
    stats = inputs.stats
    stats["numel"] = float(unique.numel())
    stats["unique"] = float(unique.sum())
    stats["shared"] = float((divisor > 1).sum())
    stats["tensors"] = 1.0
    return out.add_(base)


ram = partial(_ram, plus=False)
ramplus_tl = partial(_ram, plus=True)


def summarize_ram(totals: dict[str, float], refs: list[str], context: Any = None) -> dict[str, Any]:
    n = totals.get("numel", 0.0)
    out: dict[str, Any] = {
        "unique_fraction": totals.get("unique", 0.0) / n if n else 0.0,
        "shared_fraction": totals.get("shared", 0.0) / n if n else 0.0,
    }
    out["lines"] = [
        f"  changed by one model only: {out['unique_fraction']:.2%} of coordinates; "
        f"by several (averaged): {out['shared_fraction']:.2%}"
    ]
    return out


_EPSILON = Param("epsilon", 1e-5, doc="a task-vector entry counts as a change above this magnitude")

register(
    MergeMethod(
        name="ram",
        fn=ram,
        params=(_EPSILON,),
        base="required",
        summary="keep entries one model changed, average those several changed",
        paper="arXiv:2601.13572",
        summarize=summarize_ram,
    )
)
register(
    MergeMethod(
        name="ramplus_tl",
        fn=ramplus_tl,
        params=(
            Param("r", 0.1, doc="boost of unique entries per unit of shared/unique ratio"),
            Param("alpha", 0.2, doc="cap of the shared/unique ratio"),
            _EPSILON,
        ),
        base="required",
        summary="ram, with each model's unique entries boosted by its shared/unique ratio (per tensor)",
        paper="arXiv:2601.13572",
        elementwise=False,  # the shared/unique counts are per tensor
        summarize=summarize_ram,
    )
)
