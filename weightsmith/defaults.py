"""Defaults of the merge job's options, in a module of their own so that the pipeline and the
modules it uses (resume.py) share them without importing each other."""

DEFAULT_MEMORY_BUDGET = "1.25GB"
DEFAULT_SHARD_SIZE = "5GB"
# Where the plan runs: this process (engine/executor.py) or a Ray cluster (engine/ray_executor.py).
EXECUTORS = ("local", "ray")
