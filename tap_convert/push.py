"""Push a converted checkpoint to the Hugging Face Hub (create the repo, upload the folder).

The checkpoint is verified against its routing table's checksums first, so a corrupt
directory is never published; the local files are only read, so a failed push leaves them as
they were. Large shards go through the Hub's LFS (or Xet) path, as ``upload_folder`` does.
"""

from __future__ import annotations

import os
from pathlib import Path

from tap_runtime.checkpoint import read_checkpoint
from tap_runtime.errors import HubError

__all__ = ["push_to_hub"]


def push_to_hub(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload the TAP checkpoint in ``directory`` to ``repo_id``; returns the commit URL.

    Args:
        directory: a directory written by ``tap-convert``.
        repo_id: ``org/name``; created (``exist_ok``) if it does not exist.
        private: create the repo private (ignored when it exists).
        token: Hub token; defaults to ``HF_TOKEN`` / the saved login.
        revision: branch to commit to (default ``main``).
        endpoint: Hub URL; defaults to ``HF_ENDPOINT`` / huggingface.co.
    Raises:
        CorruptCheckpointError / ChecksumMismatchError: the directory does not verify.
        HubError: authentication, permission, missing repo or connection failures.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    directory = Path(directory)
    checkpoint = read_checkpoint(directory, verify=True)
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{api.endpoint}/{repo_id}"
    message = commit_message or (
        f"TAP checkpoint: tiers {'/'.join(map(str, checkpoint.table.tiers))}, {checkpoint.total_bytes:,} bytes"
    )
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(directory), repo_id=repo_id, repo_type="model", revision=revision, commit_message=message
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        hint = {
            401: "the token was refused; set HF_TOKEN or pass token=",
            403: "the token may not write to this repo or organisation",
            404: "the repo or revision does not exist and could not be created",
        }.get(status, "the Hub answered with an error")
        raise HubError(f"push of {directory} to {where} failed ({status}): {hint}. The local checkpoint is unchanged.") from exc
    except Exception as exc:  # connection drops arrive as httpx errors or wrapped in RuntimeError
        cause = exc.__cause__ or exc.__context__
        where_from = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        raise HubError(
            f"push of {directory} to {where} failed: {type(exc).__name__}: {exc}{where_from}. "
            f"The local checkpoint is unchanged; retry."
        ) from exc
    return str(info.commit_url if hasattr(info, "commit_url") else info)
