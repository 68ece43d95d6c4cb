"""The model card's provenance section: what, besides the inputs and the recipe, decides the
output's bytes or explains its tensor set (the random seed, key prefix mappings, tensors left
out), read from merge_report.json's fields of the same names."""

from __future__ import annotations

from typing import Any

SHOWN_DROPPED = 10  # per model; merge_report.json lists them all


def provenance_lines(report: dict[str, Any]) -> list[str]:
    """Markdown bullets (with a heading), or [] when there is nothing to say."""
    bullets: list[str] = []
    seed = report.get("random_seed")
    if seed is not None:
        bullets.append(
            f"- Random seed: {seed} (`--random-seed`; each tensor's random draws derive from it and "
            "the tensor's name, so the same seed gives the same bytes)"
        )
    for item in report.get("key_mappings") or []:
        bullets.append(
            f"- Tensor names of `{item['model']}` mapped {item['strip']!r} -> {item['add']!r} "
            "onto the reference's"
        )
    for model, names in (report.get("dropped_tensors") or {}).items():
        shown = ", ".join(f"`{n}`" for n in names[:SHOWN_DROPPED])
        more = f" and {len(names) - SHOWN_DROPPED} more" if len(names) > SHOWN_DROPPED else ""
        bullets.append(
            f"- Left out of the output (`extra_keys: ignore`): {len(names)} tensor(s) of `{model}`: "
            f"{shown}{more}"
        )
    sampled = any("sampled_fingerprint" in shard for item in report.get("inputs") or []
                  for shard in item.get("shards") or [])
    if sampled:
        bullets.append(
            "- Local input shards are identified by a sampled fingerprint (size, header and 1 MiB of "
            "data), not their sha256; `weightsmith merge --hash-inputs` records the real sha256"
        )
    return ["## Provenance", "", *bullets, ""] if bullets else []
