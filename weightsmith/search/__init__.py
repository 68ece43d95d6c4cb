"""Recipe search: tune a recipe's numbers for a held-out score, merging candidates in memory.

space.py (which numbers, within which bounds), memory_writer.py (the engine's writer that fills
a live model instead of shards), objective.py (recipe -> score), heads.py (one merge
scored under several task heads: a multi-task score), optimizer.py (CMA-ES with a
resumable trial log), report.py (best recipe, trial table, plot). docs/search.md explains it.
"""
