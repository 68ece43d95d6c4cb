"""A model card (README.md) for merged models, rendered locally from the merge's facts."""

from __future__ import annotations

from typing import Any

import yaml

from weightsmith.io.checkpoint import looks_like_hub_id


def render_model_card(
    *,
    name: str,
    method: str,
    method_summary: str,
    paper: str,
    recipe_yaml: str,
    inputs: list[dict[str, Any]],
    base: str | None,
    version: str,
    license: str | None = None,
) -> str:
    hub_inputs = [i["model"].partition("@")[0] for i in inputs if looks_like_hub_id(str(i["model"]))]
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "tags": ["merge", "weightsmith", method],
    }
    if hub_inputs:
        meta["base_model"] = hub_inputs
    if license:
        meta["license"] = license
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"This model was merged with [weightsmith](https://pypi.org/project/weightsmith/) "
        f"{version} using **{method}**: {method_summary}" + (f" ({paper})." if paper else "."),
        "",
    ]
    if base:
        lines += [f"Base model: `{base}`", ""]
    lines += ["## Inputs", "", "| model | revision | shards |", "|---|---|---|"]
    for item in inputs:
        shards = "; ".join(
            f"{s['file']} ({s['bytes']} B, "
            + (
                f"sha256 {s['sha256'][:16]}…"
                if "sha256" in s
                else f"header sha256 {s['header_sha256'][:16]}…"
            )
            + ")"
            for s in item.get("shards", [])
        )
        lines.append(f"| `{item['model']}` | {item.get('revision') or '-'} | {shards} |")
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
