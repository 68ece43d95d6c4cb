"""Compare weightsmith with mergekit on recipes of the wild corpus (tests/recipes_in_the_wild/).

Each recipe runs as tests/test_recipes_in_the_wild.py runs it (the same tiny checkpoints, the
same rewritten text), once through ``weightsmith merge --numerics mergekit`` and once through
``mergekit-yaml``; the script prints, per recipe, whether every output tensor is bit-identical
or the largest absolute difference and where it is. mergekit is LGPL: run it from its own venv.

    PYTHONPATH=. .venv/bin/python benchmarks/parity/wild_parity.py \\
        --mergekit /work/.mergekit-venv/bin/mergekit-yaml 062 071 075

Recipe arguments are file-name prefixes (none: every recipe). Multi-document recipes and the
random methods (DARE, DELLA: mergekit's masks come from its global generator) are listed as
skipped; ``--random`` runs the random ones anyway (their difference is expected).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import test_recipes_in_the_wild as wild  # noqa: E402
from wild_checkpoints import CheckpointZoo  # noqa: E402

RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> str:
    if set(ours) != set(theirs):
        only = sorted(set(ours) ^ set(theirs))
        return f"tensor sets differ ({len(only)}): {only[:4]}"
    worst, where, dtypes, differing = 0.0, "", set(), 0
    for name in sorted(ours):
        a, b = ours[name], theirs[name]
        if a.dtype != b.dtype:
            dtypes.add(f"{a.dtype}!={b.dtype}")
        if a.shape != b.shape:
            return f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if not torch.equal(a, b.to(a.dtype)):
            differing += 1
            diff = float((a.double() - b.double()).abs().max())
            if diff > worst:
                worst, where = diff, name
    note = f" (dtypes {sorted(dtypes)})" if dtypes else ""
    if not differing:
        return f"bit-identical ({len(ours)}/{len(ours)} tensors){note}"
    return f"{differing}/{len(ours)} tensors differ, max abs diff {worst:.3g} at {where}{note}"


def run(entry: dict, zoo: CheckpointZoo, work: Path, mergekit: str, ws_args: list[str]) -> str:
    arch, layers = entry["architecture"], entry["layers"]
    paths = {ref: zoo.resolve(arch, layers, local) for ref, local in entry["models"].items()}
    recipe = work / entry["file"]
    recipe.write_text(wild.rewrite_text((wild.CORPUS / entry["file"]).read_text(), paths))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    ours = work / "ws"
    got = subprocess.run(
        [sys.executable, "-m", "weightsmith.cli", "merge", str(recipe), str(ours), "--quiet", *ws_args],
        env=env, capture_output=True, text=True,
    )
    theirs = work / "mk"
    want = subprocess.run([mergekit, str(recipe), str(theirs)], env=env, capture_output=True, text=True)
    if got.returncode or want.returncode:
        tail = lambda p: (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]  # noqa: E731
        return (f"weightsmith rc={got.returncode} {tail(got)[0][:160]!r}; "
                f"mergekit rc={want.returncode} {tail(want)[0][:160]!r}")
    return compare(load_dir(ours), load_dir(theirs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", required=True, help="path to mergekit-yaml")
    ap.add_argument("--random", action="store_true", help="also run DARE/DELLA recipes")
    ap.add_argument("--default-numerics", action="store_true", help="weightsmith's default numerics")
    ap.add_argument("prefixes", nargs="*")
    args = ap.parse_args()
    ws_args = [] if args.default_numerics else ["--numerics", "mergekit"]
    with tempfile.TemporaryDirectory() as tmp:
        zoo = CheckpointZoo(Path(tmp) / "zoo")
        for entry in wild.MANIFEST:
            if args.prefixes and not any(entry["file"].startswith(p) for p in args.prefixes):
                continue
            docs = wild.load_docs(entry)
            method = docs[-1].get("merge_method")
            if len(docs) > 1:
                print(f"{entry['file']}: skipped (multi-document)")
                continue
            if method in RANDOM_METHODS and not args.random:
                print(f"{entry['file']}: skipped ({method} is random)")
                continue
            work = Path(tmp) / entry["file"].removesuffix(".yaml")
            work.mkdir()
            print(f"{entry['file']}: {run(entry, zoo, work, args.mergekit, ws_args)}", flush=True)


if __name__ == "__main__":
    main()
