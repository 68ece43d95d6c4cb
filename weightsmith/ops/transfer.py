"""Fine-tuning transfer: move fine-tuning updates from one base model version to another.

Lin, Balasubramanian, Liu, Kandpal, Vu, "Efficient Model Development through Fine-tuning
Transfer", EMNLP 2025 (reference code pjlintw/finetuning-transfer).

``base_model`` is the TARGET base m_t; each model m_s' carries ``parameters: {source_base:
m_s, weight: w}``, the base it was fine-tuned from, and contributes its diff vector:

    theta = m_t + sum_i w_i * (m_s'_i - m_s_i)

computed in float64 as the reference does (the diff of two nearby bf16 tensors loses nothing
there, and the sum is rounded once to the output dtype). Vocabulary growth follows the
reference: with ``vocab_policy: pad`` both bases are read with zero rows for the tokens the
fine-tune added, so those rows come over as the fine-tune's values (times w). The engine reads
the source bases itself (``source_base`` is a checkpoint-valued parameter), tensor by tensor.
"""

from __future__ import annotations

import torch

from weightsmith.errors import MergeError
from weightsmith.ops.registry import MergeInputs, MergeMethod, Param, register


def transfer(inputs: MergeInputs, weight: list[float], source_base: list[str]) -> torch.Tensor:
    assert inputs.base is not None
    sources = inputs.aux.get("source_base")
    if sources is None:
        raise MergeError(
            f"tensor {inputs.name!r}: transfer needs the source bases; run it through the merge "
            "engine (weightsmith merge), which reads every model's source_base checkpoint"
        )
    out = inputs.output_buffer().copy_(inputs.base)
    for i, (w, src) in enumerate(zip(weight, sources)):
        if src is None:
            raise MergeError(
                f"tensor {inputs.name!r}: source_base {source_base[i]!r} of model "
                f"{inputs.model_refs[i] if i < len(inputs.model_refs) else i!r} has no such "
                "tensor; the source base must be the checkpoint that model was fine-tuned from "
                "(same architecture as the fine-tune)"
            )
        if w == 0:
            continue  # weight 0 must give the base bit for bit, even where the diff is inf - inf
        delta = inputs.models[i].sub_(src)  # in place: the models are the method's to reuse
        out.add_(delta, alpha=w)
    return out


register(
    MergeMethod(
        name="transfer",
        fn=transfer,
        params=(
            Param("weight", 1.0, per_model=True, doc="scale of the diff vector (reference: 1)"),
            Param(
                "source_base",
                per_model=True,
                kind=str,
                checkpoint=True,
                doc="the base this model was fine-tuned from (path or Hub id)",
            ),
        ),
        base="required",
        summary="target base + sum_i weight_i * (model_i - source_base_i), in float64",
        paper="Lin et al., EMNLP 2025: Efficient Model Development through Fine-tuning Transfer",
        compute_dtype=torch.float64,
    )
)
