"""``numerics: mergekit``: each method's arithmetic as mergekit 0.1.5 does it.

weightsmith's default numerics compute in float32 (or wider) and keep every entry tied at a
selection threshold. A published merge made with mergekit and ``dtype: bfloat16`` was computed
in bfloat16, in mergekit's operation order, keeping exactly k entries in the order torch's sort
leaves ties in; reproducing it bit for bit takes the same operations. The modules here register,
per method, a function that performs them (``registry.register_numerics``); the engine only
passes the mode and the compute dtype (the recipe's ``dtype``). Written from mergekit's
documented behaviour and measured against its output (tests/test_parity_numerics.py); no
mergekit code is copied (it is LGPL).

What cannot match, and why: docs/mergekit.md, "Numerics".
"""

# Each module imports the method modules it varies first, then registers its variants.
from weightsmith.ops.mergekit_numerics import geometry, linear, masked, spheres, task_vectors  # noqa: F401
