"""Publish a finished output folder to the Hugging Face Hub as one atomic commit.

    push_to_hub("out/", "org/merged-model", private=True)

The sequence is the Hub's standard one: ``create_repo(exist_ok=True)``; each safetensors shard
pre-uploaded on its own (``preupload_lfs_files``: LFS or Xet, whichever the client uses),
so a failure mid-way loses at most one shard's transfer and a retry skips what the Hub already
holds; then a single ``create_commit`` adding every file (shards, index, config, tokenizer,
card, report), so the repo never shows a half-uploaded model.

Transient failures (HTTP 408/429/5xx, dropped connections, timeouts) are retried with
exponential backoff, a bounded number of times per step. A push that still fails leaves the
local folder as it was and its error names the exact ``weightsmith push`` command to resume;
re-running is cheap because the Hub deduplicates content already uploaded.

The token comes from huggingface_hub's standard sources (HF_TOKEN, ``hf auth login``);
weightsmith never writes it anywhere and scrubs it from every error message.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.errors import CheckpointError, OutputError
from weightsmith.io.hub import redact_token
from weightsmith.io.model_card import REPORT_FILE, refresh_model_card
from weightsmith.io.safetensors_format import read_header
from weightsmith.io.shard_index import read_index

# Status codes worth a retry: the Hub or a proxy in front of it is busy or briefly down.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_ATTEMPTS = 5
DEFAULT_BACKOFF_S = 2.0
MAX_BACKOFF_S = 60.0


class PushError(OutputError):
    """Publishing to the Hub failed or was refused; the local output is untouched."""


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    revision: str
    pr_url: str | None = None
    files: list[str] = field(default_factory=list)
    bytes: int = 0


# ---------------------------------------------------------------------------- the folder
def collect_output_files(folder: str | Path) -> list[tuple[str, Path]]:
    """Every file to publish as ``(path in repo, local path)``, after checking the folder is complete.

    Complete means: a ``config.json``; either a ``*.safetensors.index.json`` whose every shard is
    present with a readable, untruncated header listing the tensors the index puts there, or a
    single ``model.safetensors``; and no stray ``.safetensors`` file the index does not name (a
    leftover shard from another run would be published alongside the real ones). Hidden files
    and folders (``.cache/``, weightsmith's temporary folders) are never published.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: no such folder; give the OUT folder of a finished merge")
    if ".weightsmith-tmp-" in folder.name:
        raise PushError(f"{folder}: this is an unfinished merge's temporary folder; it cannot be pushed")
    files = sorted(
        (p.relative_to(folder).as_posix(), p)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    names = {rel for rel, _ in files}
    not_complete = f"{folder} is not a complete model output"
    if "config.json" not in names:
        raise PushError(f"{not_complete}: config.json is missing")
    indexes = sorted(n for n in names if n.endswith(".safetensors.index.json") and "/" not in n)
    weights = {n for n in names if n.endswith(".safetensors")}
    if len(indexes) > 1:
        raise PushError(f"{not_complete}: several shard indexes ({', '.join(indexes)}); keep one")
    if indexes:
        weight_map = _weight_map(folder / indexes[0])
        expected: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            expected.setdefault(shard, set()).add(tensor)
        missing = sorted(s for s in expected if s not in names)
        if missing:
            raise PushError(
                f"{not_complete}: {indexes[0]} lists {len(missing)} shard(s) that are not there: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        stray = sorted(weights - set(expected))
        if stray:
            raise PushError(
                f"{not_complete}: {', '.join(stray[:5])} not listed in {indexes[0]} (left from "
                "another run?); remove them or re-run the merge into a new folder"
            )
        for shard, tensors in sorted(expected.items()):
            found = _header_names(folder / shard)
            absent = sorted(tensors - found)
            if absent:
                raise PushError(
                    f"{not_complete}: {indexes[0]} puts {absent[0]!r}"
                    f"{f' and {len(absent) - 1} more' if len(absent) > 1 else ''} in {shard}, "
                    "whose header does not list it"
                )
    elif weights == {"model.safetensors"}:
        _header_names(folder / "model.safetensors")
    elif weights:
        raise PushError(
            f"{not_complete}: {len(weights)} .safetensors files but no *.safetensors.index.json"
        )
    else:
        raise PushError(f"{not_complete}: no model.safetensors or *.safetensors.index.json")
    return files


def _weight_map(path: Path) -> dict[str, str]:
    try:
        return read_index(path)
    except CheckpointError as e:
        raise PushError(f"refusing to push: {e}") from e


def _header_names(path: Path) -> set[str]:
    try:
        entries, _ = read_header(str(path))
    except CheckpointError as e:
        raise PushError(f"refusing to push: {e}") from e
    return set(entries)


def resume_command(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> str:
    """The ``weightsmith push`` command line that repeats this push (shell-quoted)."""
    parts = ["weightsmith", "push", str(folder), repo_id]
    if private:
        parts.append("--private")
    if revision:
        parts += ["--revision", revision]
    if create_pr:
        parts.append("--create-pr")
    if commit_message:
        parts += ["--message", commit_message]
    return shlex.join(parts)


# ---------------------------------------------------------------------------- checks before a merge
def check_can_push(repo_id: str) -> None:
    """Fail fast (before an hour-long merge) when a push could not succeed afterwards."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"--push-to {repo_id!r}: not a valid Hub repo id ({e})") from None
    if "/" not in repo_id:
        raise PushError(f"--push-to {repo_id!r}: give the full id, owner/name")
    if constants.is_offline_mode():
        raise PushError("--push-to: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it first")
    if not get_token():
        raise PushError("--push-to: not logged in to the Hub; run `hf auth login` or set HF_TOKEN first")


# ---------------------------------------------------------------------------- the push
def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff_s: float = DEFAULT_BACKOFF_S,
    refresh_card: bool = True,
    log: Callable[[str], None] | None = None,
) -> PushResult:
    """Upload a finished output folder to ``repo_id`` in one commit (see the module doc).

    ``private`` creates the repo private and refuses to push into an existing public one.
    ``revision`` is the branch to commit to (created from main when missing); with ``create_pr``
    the commit opens a pull request against it instead. ``token``/``endpoint`` default to
    huggingface_hub's own resolution (HF_TOKEN or the login token; HF_ENDPOINT).
    ``refresh_card`` re-renders a weightsmith README.md first, so an ``eval_results.json``
    added after the merge shows on the Hub.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder).absolute()
    resume = resume_command(
        folder,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
    )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"{repo_id!r} is not a valid Hub repo id ({e})") from None
    collect_output_files(folder)  # refuse an incomplete folder before touching anything
    if refresh_card:
        _refresh_card(folder)
    files = collect_output_files(folder)
    if constants.is_offline_mode():
        raise PushError(f"HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it and run: {resume}")
    say = log or (lambda message: None)
    retry = _Retry(attempts=max(1, attempts), backoff_s=backoff_s, log=say)
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or _default_message(folder)
    total = sum(path.stat().st_size for _, path in files)
    try:
        # private=None (not False) leaves an existing repo's or an organization's default visibility.
        repo_url = retry(
            "create repo", lambda: api.create_repo(repo_id, private=private or None, exist_ok=True)
        )
        if private:
            info = retry("read repo settings", lambda: api.repo_info(repo_id))
            if info.private is False:
                raise PushError(
                    f"{repo_id} already exists and is public; --private will not publish into it. "
                    "Make it private on the Hub first, or push without --private"
                )
        if revision and revision != "main" and not revision.startswith("refs/"):
            # A commit to a missing branch is a 404: start the branch from main.
            retry(
                f"create branch {revision}",
                lambda: api.create_branch(repo_id, branch=revision, exist_ok=True),
            )
        ops = [(rel.endswith(".safetensors"), CommitOperationAdd(rel, str(path))) for rel, path in files]
        shards = [op for is_shard, op in ops if is_shard]
        others = [op for is_shard, op in ops if not is_shard]
        for n, op in enumerate(shards, 1):
            say(f"uploading {op.path_in_repo} ({n}/{len(shards)}, {op.upload_info.size:,} bytes)")
            retry(
                f"upload {op.path_in_repo}",
                lambda op=op: api.preupload_lfs_files(
                    repo_id, additions=[op], revision=revision, create_pr=create_pr, free_memory=False
                ),
            )
        say(f"committing {len(files)} files to {repo_id}")
        commit = retry(
            "commit",
            lambda: api.create_commit(
                repo_id,
                operations=[*shards, *others],
                commit_message=message,
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            ),
        )
    except PushError as e:
        raise PushError(f"{e}. The local output {folder} is intact; after fixing it, run: {resume}") from None
    except Exception as e:  # anything from the client: HTTP, transport, validation
        raise PushError(
            redact_token(
                f"push of {folder} to {repo_id} failed: {_explain(e, repo_id)}. Nothing was committed "
                f"and the local output is intact; resume with: {resume}"
            )
        ) from None
    return PushResult(
        repo_id=repo_id,
        repo_url=str(repo_url),
        commit_url=commit.commit_url,
        commit_oid=commit.oid,
        revision=revision or "main",
        pr_url=commit.pr_url,
        files=[rel for rel, _ in files],
        bytes=total,
    )


def _refresh_card(folder: Path) -> None:
    """Re-render the card; a damaged or hand-edited report is named instead of crashing the push."""
    try:
        refresh_model_card(folder)
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as e:
        raise PushError(
            f"refusing to push: {folder / REPORT_FILE} cannot be rendered into the model card "
            f"({type(e).__name__}: {str(e)[:200]}); restore it by re-running the merge, or push with "
            "refresh_card=False to keep README.md as it is"
        ) from e


def _default_message(folder: Path) -> str:
    try:
        report = json.loads((folder / REPORT_FILE).read_text())
        return f"Upload {report.get('name') or folder.name}: {report['merge_method']} merge (weightsmith)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return f"Upload {folder.name} (weightsmith)"


@dataclass
class _Retry:
    """Run one push step, retrying transient failures with capped exponential backoff."""

    attempts: int
    backoff_s: float
    log: Callable[[str], None]

    def __call__(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except PushError:
                raise
            except Exception as e:
                if attempt == self.attempts or not is_transient(e):
                    raise
                wait = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1))
                self.log(
                    redact_token(
                        f"{what}: {_first_line(e)}; retrying in {wait:.1f}s "
                        f"(attempt {attempt + 1} of {self.attempts})"
                    )
                )
                time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def is_transient(error: BaseException) -> bool:
    """Whether a failure (or one it wraps) is worth retrying: 408/429/5xx or a transport error."""
    from huggingface_hub.errors import HfHubHTTPError

    transport_errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    try:  # the client's HTTP library: httpx2 in huggingface_hub 2.x
        import httpx2

        transport_errors += (httpx2.TransportError,)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, HfHubHTTPError):
            return e.response is not None and e.response.status_code in TRANSIENT_STATUS
        if isinstance(e, transport_errors):
            return True
        e = e.__cause__ or e.__context__
    return False


def _explain(error: BaseException, repo_id: str) -> str:
    """One line saying what went wrong and, for the usual causes, what to do."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, RevisionNotFoundError):
        return f"the branch does not exist on {repo_id} ({_first_line(error)})"
    if isinstance(error, RepositoryNotFoundError) or status == 401:
        return (
            f"the Hub refused the token or cannot find {repo_id} (HTTP {status}); log in with "
            "`hf auth login` or set HF_TOKEN to a token with write access"
        )
    if status == 403:
        return f"the token in use has no write access to {repo_id} (HTTP 403); use a write token"
    if isinstance(error, HfHubHTTPError) and status in TRANSIENT_STATUS:
        return f"the Hub kept failing (HTTP {status}) after several retries"
    if is_transient(error):
        return f"the connection to the Hub kept failing ({_first_line(error)}) after several retries"
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
