"""Peak memory stays under --memory-budget when the inputs are many times larger."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from models import save_model

CHILD = textwrap.dedent(
    """
    import json, sys
    import weightsmith
    from weightsmith.pipeline import merge
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    # Import everything a merge uses and start torch's thread pool, then measure: the
    # budget covers tensor memory, not the interpreter and libraries.
    import torch, weightsmith.engine.executor, weightsmith.engine.passes, weightsmith.ops
    import weightsmith.engine.summary, weightsmith.io.model_card, tqdm.auto, yaml
    torch.ones(1 << 16).add_(1).sum()
    # A tiny merge of the same kind first (split into row blocks by a tiny budget): it loads
    # the compiled kernels and lazily loaded library code and starts the thread pools, which
    # are code and threads, not tensor memory.
    merge(sys.argv[4], sys.argv[5], memory_budget=2**20)
    weightsmith.ops.fused.warm_up()  # the units above were too small for the fused kernels
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # high-water mark := current RSS; read after, so reclaimed pages cannot skew it
    baseline = status("VmHWM:")
    merge(sys.argv[1], sys.argv[2], memory_budget=sys.argv[3])
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM:")}))
    """
)


def _model(folder, seed, rows):
    g = torch.Generator().manual_seed(seed)
    # Few large tensors: the case where naive tools hold whole tensors of every input at once.
    state = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(rows, 1024, generator=g).bfloat16()
             for i in range(4)}
    state["model.embed_tokens.weight"] = torch.randn(rows, 1024, generator=g).bfloat16()
    return save_model(folder, state, {"num_hidden_layers": 4}, shards=2)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_peak_memory_stays_under_budget(tmp_path, method):
    rows = 4096  # 5 tensors x 4096 x 1024 bf16 = 42 MB per model
    base = _model(tmp_path / "base", 0, rows)
    models = [_model(tmp_path / f"ft{i}", i + 1, rows) for i in range(3)]
    # Per-tensor TIES needs each tensor's top-k threshold: tensors over the budget are merged
    # in row blocks after streamed statistics passes over them, instead of whole.
    params = {"weight": 0.3, **({"density": 0.2} if method == "ties" else {})}
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": params} for m in models],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    tiny = [_model(tmp_path / f"tiny{i}", i, 64) for i in range(4)]
    warm = dict(recipe, base_model=str(tiny[0]),
                models=[{"model": str(m), "parameters": params} for m in tiny[1:]])
    (tmp_path / "warm.yaml").write_text(json.dumps(warm))
    inputs_bytes = 4 * 5 * rows * 1024 * 2
    budget = 16 * 2**20
    assert inputs_bytes > 5 * budget  # inputs are several times the budget
    # float32 working copies of one tensor of all 4 inputs alone would be 4 x 8 MB = 32 MB
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "RECIPE.yaml").replace("RECIPE", "r"),
         str(tmp_path / "out"), str(budget), str(tmp_path / "warm.yaml"), str(tmp_path / "warm")],
        capture_output=True, text=True, check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    growth = figures["peak"] - figures["baseline"]
    print(f"peak RSS growth {growth / 2**20:.1f} MiB under a {budget / 2**20:.0f} MiB budget")
    assert growth <= budget, figures
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    if method == "ties":
        report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
        assert report["summary"]["global_passes"] == 2  # the thresholds: two radix levels
