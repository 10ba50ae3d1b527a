"""Hugging Face hub ids: a one-line failure, at once, for an id that is neither local, cached nor reachable."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from nmcli.errors import SourceError


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub endpoint answers a TCP connection within ``timeout`` seconds."""
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except Exception:  # noqa: BLE001 - no hub client: let transformers report it
        return True
    host = endpoint.hostname or ""
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_hub_id(spec: str, ident: str) -> None:
    """Fail fast, in one line, for a hub id that is neither local, cached, nor reachable.

    Offline, transformers retries the hub for half a minute before failing.
    """
    if Path(ident).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(ident, "config.json"), str):
            return
    except Exception:  # noqa: BLE001 - a malformed id: transformers gives the better message
        return
    if not _hub_reachable():
        raise SourceError(
            f"{spec}: no local directory {ident!r}, not in the Hugging Face cache, and the hub cannot be reached: "
            "give a local directory (hf:./path, saved with save_pretrained) or go online"
        )
