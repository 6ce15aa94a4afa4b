"""The HuggingFace Hub: a model id to a local model directory, from the cache or downloaded.

    repo_id = hub_id(src)           # "hf://org/name" -> "org/name"; anything else: None
    if repo_id is not None:
        directory = download(repo_id)   # holds HF_CONFIG_NAME and the weights

A hub id is always explicit, `hf://org/name`: a mistyped local path is "no such file", never a
download, so no command opens a network connection unless the user named a hub model.

A hub id that is not in the cache fails at once, naming the id, when offline or when the hub
cannot be reached (`_unreachable` probes it within seconds, where huggingface_hub would retry
for half a minute). Reading the directory is `segcompare.models.checkpoint`'s.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import urllib.parse
from pathlib import Path

from segcompare.utils import SegcompareError, first_line

# The files of a HuggingFace model directory.
HF_CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"  # our file name and HuggingFace's
HF_BIN_NAME = "pytorch_model.bin"
HF_INDEX_NAME = "model.safetensors.index.json"  # a sharded model's key -> file map

HUB_PREFIX = "hf://"  # a HuggingFace Hub model: hf://owner/name
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
_HUB_PROBE_TIMEOUT_S = 3.0


def hub_id(src: str) -> str | None:
    """The `owner/name` of a hub reference `hf://owner/name`; None for anything else (a local
    path). SegcompareError for an `hf://` reference that is not `owner/name`."""
    if not src.startswith(HUB_PREFIX):
        return None
    repo_id = src[len(HUB_PREFIX) :]
    if not _HUB_ID.match(repo_id) or ".." in repo_id:
        raise SegcompareError(f"{src}: not a HuggingFace Hub id; expected {HUB_PREFIX}owner/name")
    return repo_id


def download(repo_id: str) -> Path:
    """The local directory of hub model `repo_id` (config.json + weights), from the cache or
    downloaded. Fails at once, naming the id, when offline or when the hub cannot be reached."""
    name = HUB_PREFIX + repo_id  # as the user wrote it
    advice = "or pass a local path (a checkpoint file or a directory with config.json)"
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
    except ImportError:
        raise SegcompareError(
            f"{name}: a HuggingFace Hub id needs `pip install huggingface_hub`; {advice}"
        ) from None

    def fetch(local_only: bool) -> Path:
        config = hf_hub_download(repo_id, HF_CONFIG_NAME, local_files_only=local_only)
        for name in (WEIGHTS_NAME, HF_BIN_NAME):
            try:
                hf_hub_download(repo_id, name, local_files_only=local_only)
                return Path(config).parent
            except EntryNotFoundError:  # also "not in the cache" when local_only
                continue
        raise SegcompareError(f"{name}: the hub model has no model.safetensors or .bin")

    try:
        return fetch(local_only=True)  # the cache: no network
    except (EntryNotFoundError, FileNotFoundError, SegcompareError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or constants.HF_HUB_OFFLINE:
        raise SegcompareError(
            f"{name}: not in the HuggingFace cache, and HF_HUB_OFFLINE is set; {advice}"
        )
    unreachable = _unreachable(constants.ENDPOINT)
    if unreachable:
        raise SegcompareError(
            f"{name}: not in the HuggingFace cache, and the HuggingFace Hub "
            f"({constants.ENDPOINT}) cannot be reached ({unreachable}); {advice}"
        )
    try:
        return fetch(local_only=False)
    except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as err:
        raise SegcompareError(
            f"{name}: downloading it from the HuggingFace Hub failed ({first_line(err)}); "
            f"{advice}"
        ) from None


def _unreachable(endpoint: str) -> str:
    """Why a TCP connection to `endpoint` fails within a few seconds, or '' when it works.

    huggingface_hub retries an unreachable hub for half a minute; this probe answers at once.
    It runs in a daemon thread because name resolution has no timeout of its own.
    """
    url = urllib.parse.urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    result = ["timed out"]

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S).close()
            result[0] = ""
        except OSError as err:
            result[0] = str(err) or type(err).__name__

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_HUB_PROBE_TIMEOUT_S + 1.0)
    return result[0]
