"""Hub repo ids resolved through the huggingface_hub cache.

Only safetensors, JSON and tokenizer files are fetched: never pickles, never code, so a
recipe can name any public repo without running anything from it.
"""

from __future__ import annotations

import re
from pathlib import Path

from weightsmith.errors import CheckpointError
from weightsmith.model_ref import at_revision

ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.txt",
    "merges.txt",
    "*.jinja",
]


def redact_token(text: str) -> str:
    """``text`` with the Hub token (from any standard source) replaced, for errors and logs."""
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # no token source is readable: nothing to hide
        return text
    if token and len(token) >= 4:
        text = text.replace(token, "hf_***")
    return text


def _cache_hint(repo_id: str, revision: str | None) -> str:
    """Where the cache would hold this snapshot, so "not cached" names the missing entry."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    rev = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        return str(folder / "snapshots" / rev)
    return str(folder / "refs" / rev)


def _offline_reason() -> str:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    return "the Hub cannot be reached"


def resolve_hub_model(ref: str) -> tuple[Path, str | None]:
    """Return (local snapshot folder, resolved commit) for ``org/name[@revision]``.

    Gated and private repos use the standard token sources of huggingface_hub (HF_TOKEN, the
    token file written by ``hf auth login``); weightsmith never takes, stores or prints a token.
    """
    parsed = at_revision(ref)
    repo_id, revision = parsed.path, parsed.revision
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            IncompleteSnapshotError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - huggingface-hub is a core dependency
        raise CheckpointError(f"model {ref!r}: huggingface_hub is not installed ({e})") from e
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except IncompleteSnapshotError as e:
        raise CheckpointError(
            redact_token(
                f"model {ref!r}: the cached snapshot {getattr(e, 'snapshot_path', '')} is incomplete and "
                f"{_offline_reason()}: {e}"
            )
        ) from e
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"model {ref!r}: not in the local Hub cache (no {_cache_hint(repo_id, revision)}) and "
            f"{_offline_reason()}. Download it once with network access (hf download {repo_id}"
            f"{' --revision ' + revision if revision else ''}), or give a local path."
        ) from e
    except GatedRepoError as e:
        raise CheckpointError(
            f"model {ref!r}: gated repository; accept its terms on the Hub, then log in "
            "(hf auth login, or set HF_TOKEN) with an account that has access"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"model {ref!r}: revision {revision!r} does not exist") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"model {ref!r}: no such repository on the Hub, or it is private and the token in use "
            "cannot read it (log in with hf auth login, or set HF_TOKEN)"
        ) from e
    except HfHubHTTPError as e:
        raise CheckpointError(redact_token(f"model {ref!r}: the Hub answered with an error: {e}")) from e
    _check_snapshot_shards(ref, folder)
    # snapshot folders are named by commit hash
    return folder, folder.name


def _check_snapshot_shards(ref: str, folder: Path) -> None:
    """Name the shard files a cached snapshot lacks (offline, a partial download goes unnoticed).

    Without a cached tree listing, huggingface_hub returns a snapshot folder offline even when
    an interrupted download left shards out; say which ones rather than fail later on a path.
    """
    from weightsmith.io.shard_index import read_index

    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(read_index(index).values())
        except CheckpointError:
            return  # Checkpoint reports a malformed index with its own message
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise CheckpointError(
                f"model {ref!r}: the cached snapshot {folder} lacks {len(missing)} shard(s) its index "
                f"lists: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. The download was "
                f"interrupted; re-run it with network access (hf download {at_revision(ref).path}) "
                "or unset HF_HUB_OFFLINE so weightsmith fetches them."
            )
