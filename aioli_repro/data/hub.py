"""The HF hub from a compute node: is it reachable, and if not, use only what is cached.

Compute nodes are often offline. Left alone, `datasets` and `transformers` retry the hub for minutes before
using a cached copy or failing. A run asks `hub_unreachable()` (a 3 s probe, or the user's own offline
variables) before it would touch the hub; when it is unreachable it switches this process to the HF offline
mode (`use_offline_mode`), so cached data and tokenizers load at once and anything missing fails at once,
with our message naming `make prepare`.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

_TRUE = {"1", "ON", "YES", "TRUE"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline_requested() -> bool:
    return any(os.environ.get(v, "").strip().upper() in _TRUE for v in _OFFLINE_VARS)


def hub_unreachable() -> bool:
    """An HF offline variable is set, or the hub's host does not answer within 3 s (no proxy set)."""
    if offline_requested():
        return True
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return False  # the hub is reached through a proxy: let the download itself try
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=3).close()
    except OSError:
        return True
    return False


def use_offline_mode() -> None:
    """HF offline mode for the rest of this process (and its children), also in the HF libraries that
    read their variables when first imported."""
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def offline_if_unreachable() -> bool:
    """Switch to the offline mode when the hub cannot be reached; True if the process is offline now."""
    if hub_unreachable():
        use_offline_mode()
        return True
    return False
