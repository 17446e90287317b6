"""Models named by a hub id: read from this machine's Hugging Face cache at plan time.

A hub id that the cache holds (at `model.revision` where one is pinned) is planned as the snapshot folder
itself: the plan gets the model's real shape (memory, trainable counts), and the ranks read a local folder —
no download on compute nodes, which are often offline, and the exact files the plan saw. A hub id the cache
does not hold stays a hub id, with a warning: every rank would download it at start-up. `dist-ft prepare`
fetches it once (the one command that may touch the network).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dist_ft.recipe.model_shape import is_dir
from dist_ft.recipe.strict import Problem

# `gpt2`, `org/name`: letters, digits, - _ . ; one slash at most (a hub id never has two).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_hub_id(name: str | None) -> bool:
    return bool(name) and not name.startswith("package:") and name != "byte" and bool(HUB_ID.match(name))


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cache's folder for repo_id at revision (a branch, tag or commit), without touching the network."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 — LocalEntryNotFoundError, HFValidationError, OSError: not usable here
        return None
    return folder if is_dir(folder) else None


def path_problem(name: str, base: Path) -> Problem | None:
    """A name that reads as a path (two slashes, a trailing one, or a first part that is a local folder) but
    names no folder: refused, where it would otherwise be sent to the hub as a repository id."""
    parts = name.rstrip("/").split("/")
    if name.startswith("package:") or is_dir(Path(name).expanduser()) or is_dir(base / name):
        return None
    if name.endswith("/") or len(parts) > 2 or (len(parts) == 2 and is_dir(base / parts[0])):
        return Problem("model.name_or_path", f"{name} is not a directory (relative paths are read from the "
                       f"recipe's folder, {base})", "give an existing model folder, or a hub id `org/name`")
    return None


def fetch(repo_id: str, revision: str | None) -> Path:
    """Download (or find) the snapshot: `dist-ft prepare`'s part for a hub model. Raises OSError with the
    reason and the fix when the hub cannot be reached."""
    from huggingface_hub import snapshot_download

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise OSError(f"{repo_id} is not in the Hugging Face cache ({hub_cache()}) and HF_HUB_OFFLINE is set: "
                      "run `dist-ft prepare` on a machine with network, with HF_HOME on the shared file system")
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as err:  # noqa: BLE001 — network, authentication (gated: HF_TOKEN), unknown repo
        raise OSError(f"cannot download {repo_id}{f' at {revision}' if revision else ''}: "
                      f"{str(err).splitlines()[0][:300]} (gated models need HF_TOKEN in the environment)") from None
