"""Fetching a repository from the model hub into the hub's own cache: the one place soragen downloads."""

from __future__ import annotations

import os
from pathlib import Path

from soragen.core.errors import SoragenError


def fetch(repo_id: str, patterns: list[str], what: str = "model") -> Path:
    """The snapshot of `repo_id` (the files matching `patterns`), downloaded or found in the cache;
    SoragenError in one line where it cannot be had (offline, unknown, no network)."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, no network: huggingface_hub raises many classes
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = ("the hub is offline (HF_HUB_OFFLINE) and it is not in the hub cache" if offline else
               (str(err).strip().splitlines() or [type(err).__name__])[0])
        raise SoragenError(f"cannot fetch {what} {repo_id}: {why}; download it where there is network "
                           f"(huggingface-cli download {repo_id}) or pass a local folder") from err
