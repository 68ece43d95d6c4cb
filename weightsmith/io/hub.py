"""Hub repo ids resolved through the huggingface_hub cache.

Only safetensors, JSON and tokenizer files are fetched: never pickles, never code, so a
recipe can name any public repo without running anything from it.
"""

from __future__ import annotations

from pathlib import Path

from weightsmith.errors import CheckpointError

ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.txt",
    "merges.txt",
    "*.jinja",
]


def split_revision(ref: str) -> tuple[str, str | None]:
    repo_id, _, revision = ref.partition("@")
    return repo_id, revision or None


def resolve_hub_model(ref: str) -> tuple[Path, str | None]:
    """Return (local snapshot folder, resolved commit) for ``org/name[@revision]``."""
    repo_id, revision = split_revision(ref)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - huggingface-hub is a core dependency
        raise CheckpointError(f"model {ref!r}: huggingface_hub is not installed ({e})") from e
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"model {ref!r}: not in the local Hub cache and the Hub cannot be reached (offline "
            f"mode or no network). Download it once with network access, or give a local path. ({e})"
        ) from e
    except GatedRepoError as e:
        raise CheckpointError(
            f"model {ref!r}: gated repository; accept its terms on the Hub and log in "
            "(huggingface-cli login or HF_TOKEN)"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"model {ref!r}: revision {revision!r} does not exist") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"model {ref!r}: no such repository on the Hub (or it is private: log in first)"
        ) from e
    # snapshot folders are named by commit hash
    return folder, folder.name
