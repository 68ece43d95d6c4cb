"""Workflow commands (graft, transfer, bang, ...): one module each, listing ``COMMANDS``.

They import heavy dependencies (transformers) only when run, so ``weightsmith --help`` stays
fast and works without the ``[train]`` extra.
"""
