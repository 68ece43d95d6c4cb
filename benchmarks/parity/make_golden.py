"""Regenerate the mergekit parity goldens under tests/data/parity/.

Builds the tiny inputs described by tests/data/parity/inputs.json (twice, to check the build is
bit-stable), runs ``mergekit-yaml`` offline on every recipe in tests/data/parity/recipes/, and
stores each output as golden/<recipe>.safetensors plus the input digests in inputs.json.

mergekit is LGPL: install it in its own venv, never in weightsmith's:

    python3 -m venv .bench/mergekit-venv
    .bench/mergekit-venv/bin/pip install torch==2.13.0 mergekit==0.1.5
    .venv/bin/python benchmarks/parity/make_golden.py --mergekit .bench/mergekit-venv/bin/mergekit-yaml

``--only NAME ...`` regenerates just those recipes' goldens and leaves the others alone.
``--numerics`` works on the ``numerics: mergekit`` set instead (recipes_numerics/ into
golden_numerics/: the same recipes with ``dtype: bfloat16`` / ``float16``). Either
way it says, for each golden it writes, whether the bytes are new, unchanged or changed.
``--multi`` works on the multi-stage recipes (recipes_multi/ into golden_multi/): it runs
``mergekit-multi`` (beside ``--mergekit``) with an intermediate folder and keeps the final
(unnamed) stage's output.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import test_parity_mergekit as parity  # noqa: E402
import test_parity_multistage as multi  # noqa: E402


def mergekit_version(exe: Path) -> str:
    python = exe.parent / "python"
    code = "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"
    done = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mergekit", type=Path, default=REPO / ".bench/mergekit-venv/bin/mergekit-yaml")
    parser.add_argument("--keep", type=Path, help="also keep mergekit's full output folders here")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="regenerate only these recipes (file stems)"
    )
    parser.add_argument(
        "--numerics",
        action="store_true",
        help="the --numerics mergekit set: recipes_numerics/ (bf16/fp16 arithmetic) into golden_numerics/",
    )
    parser.add_argument(
        "--multi",
        action="store_true",
        help="the multi-stage set: recipes_multi/ run by mergekit-multi into golden_multi/",
    )
    args = parser.parse_args()
    exe = args.mergekit.absolute()
    if not exe.is_file():
        sys.exit(f"{exe}: no mergekit-yaml there (see this script's docstring)")
    if args.multi and args.numerics:
        sys.exit("--multi and --numerics: one set at a time")
    if args.numerics:
        recipes, golden_dir = parity.NUMERICS_RECIPES, parity.NUMERICS_GOLDEN
    elif args.multi:
        recipes, golden_dir = multi.MULTI_RECIPES, multi.MULTI_GOLDEN
    else:
        recipes, golden_dir = parity.RECIPES, parity.GOLDEN
    # The numerics goldens are xz-compressed (bf16 exponents compress by about a third).
    suffix = ".safetensors.xz" if args.numerics else ".safetensors"

    def golden_bytes(path: Path) -> bytes:
        return lzma.decompress(path.read_bytes()) if args.numerics else path.read_bytes()
    if args.only:
        unknown = sorted(set(args.only) - {r.stem for r in recipes})
        if unknown:
            sys.exit(f"no recipe named {', '.join(unknown)} under {recipes[0].parent}")
        recipes = [r for r in recipes if r.stem in args.only]

    with tempfile.TemporaryDirectory(prefix="ws-parity-") as tmp:
        root = Path(tmp)
        folders = parity.build_inputs(root / "inputs")
        digests = parity.input_digests(folders)
        again = parity.input_digests(parity.build_inputs(root / "inputs-again"))
        if again != digests:
            sys.exit("building the inputs twice gave different tensors: the generator is not bit-stable")

        recorded = json.loads((parity.DATA / "inputs.json").read_text()).get("sha256")
        if args.only and digests != recorded:
            sys.exit("the inputs differ from those of the existing goldens: regenerate them all")
        if (args.numerics or args.multi) and digests != recorded:
            sys.exit("the inputs differ from those of the float32 goldens: regenerate those first")
        golden_dir.mkdir(parents=True, exist_ok=True)
        before = {p.name.removesuffix(suffix): golden_bytes(p) for p in golden_dir.glob(f"*{suffix}")}
        if not args.only:
            for old in golden_dir.glob(f"*{suffix}"):
                old.unlink()
        for recipe in recipes:
            if args.multi:
                docs = multi.materialize_stages(recipe, folders)
                config = multi.write_stages(docs, root / f"{recipe.stem}.yaml")
                stages = root / "stages" / recipe.stem  # mergekit-multi's --intermediate-dir
                out = root / "out" / recipe.stem
                multi.run_mergekit_multi(multi.mergekit_multi(exe), config, out, stages)
            else:
                raw = parity.materialize(recipe, folders)
                out = parity.run_mergekit(str(exe), raw, root / "out" / recipe.stem, root)
            shards = sorted(out.glob("*.safetensors"))
            if len(shards) != 1:
                sys.exit(f"{recipe.stem}: expected one output shard from mergekit, got {shards}")
            data = shards[0].read_bytes()
            golden = golden_dir / f"{recipe.stem}{suffix}"
            golden.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME) if args.numerics else data)
            old = before.get(recipe.stem)
            state = "new" if old is None else "unchanged" if old == data else "CHANGED"
            print(f"{recipe.stem}: {state} ({', '.join(sorted(p.name for p in out.iterdir()))})")
            if args.keep:
                shutil.copytree(out, args.keep / recipe.stem, dirs_exist_ok=True)

    spec = json.loads((parity.DATA / "inputs.json").read_text())
    spec["sha256"] = digests
    spec["generated_by"] = {
        "mergekit_and_torch": mergekit_version(exe),
        "torch_for_inputs": parity.torch.__version__,
    }
    (parity.DATA / "inputs.json").write_text(json.dumps(spec, indent=2) + "\n")
    print(f"wrote {len(recipes)} goldens to {golden_dir}")


if __name__ == "__main__":
    main()
