"""Resolve a model argument to a local checkpoint folder: a path is used as is, a hub id is fetched if possible.

fieldpack builds offline by default; a Hugging Face hub id is only downloaded when ``huggingface_hub`` can
reach the hub (it honours ``HF_HUB_OFFLINE=1``). Otherwise the user is asked, in one line, for a local path.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fieldpack.shared.errors import InputNotFoundError, UsageError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def hub_or_local(model: str) -> Path:
    """Return a local folder for ``model``: an existing directory, or a hub id (``org/name``) downloaded.

    Args:
        model: a filesystem path or a Hugging Face hub id such as ``"Qwen/Qwen2.5-0.5B-Instruct"``.

    Returns:
        The folder holding config.json, the safetensors and the tokenizer files.

    Raises:
        InputNotFoundError: ``model`` looks like a path (absolute, ``./``, ``~``, or more than one ``/``)
            and does not exist, or is a file rather than a folder.
        UsageError: ``model`` is a hub id and the hub cannot be reached (offline, no network, unknown repo).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputNotFoundError(f"{model} is a file, not a model folder", hint="pass the checkpoint folder")
    if not _HUB_ID.match(model):
        raise InputNotFoundError(
            f"model {model} does not exist",
            hint="pass a local Hugging Face checkpoint folder or a .gguf file (check the path's spelling)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            model, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
        )
    except Exception as exc:  # offline mode, DNS, HTTP 401/404: all mean "no model from the hub"
        raise UsageError(
            f"Cannot fetch {model} from the Hugging Face hub ({type(exc).__name__})",
            hint=f"download it where there is network (huggingface-cli download {model} --local-dir DIR) "
            "and pass the local folder DIR",
        ) from exc
    logger.info("fetched %s from the hub into %s", model, local)
    return Path(local)
