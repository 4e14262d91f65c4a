"""Uploading an export folder to the Hub (or any `HF_ENDPOINT`): `push_to_hub`, `push_packed_dir`.

Failures of the endpoint raise `HubUploadError` carrying the HTTP status and the local export path, which is
left intact so the upload can simply be retried. The token is never logged, written to the card or put in
an error message.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .card import (
    STALE_WEIGHT_PATTERNS,
    _check_plots,
    _metrics_table,
    _read_export_config,
    _scrub,
    _secrets,
    write_model_card,
)

logger = logging.getLogger(__name__)


class HubUploadError(RuntimeError):
    """The Hub endpoint refused or failed the upload; the local export at `local_dir` is intact.

    Attributes: `status_code` (HTTP status, None when the endpoint could not be reached), `local_dir`,
    `repo_id`, `endpoint`.
    """

    def __init__(self, message: str, *, status_code: int | None, local_dir: Path, repo_id: str, endpoint: str):
        super().__init__(message)
        self.status_code = status_code
        self.local_dir = local_dir
        self.repo_id = repo_id
        self.endpoint = endpoint


# -- model card --------------------------------------------------------------------------------------------
def push_packed_dir(
    local_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool | None = None,
    *,
    commit_message: str | None = None,
) -> str:
    """Upload an existing `save_packed` export folder to `repo_id`; returns the repo URL.

    Writes a model card first when the folder has no `README.md`. Stale weight shards of an earlier push
    are deleted in the same commit. Raises `HubUploadError` (HTTP status, local path) when the endpoint fails.
    """
    local_dir = Path(local_dir)
    export_config = _read_export_config(local_dir)
    if export_config.get("quant_method") != "hfqat":
        raise ValueError(
            f"local_dir={str(local_dir)!r} is not an hfqat export (no config.json with quantization_config."
            "quant_method 'hfqat'); write one with hfqat.save_packed(model, path)"
        )
    secrets = _secrets(token)
    if not (local_dir / "README.md").is_file():
        write_model_card(None, local_dir, repo_id=repo_id, redact=secrets)
    return _upload(local_dir, repo_id, token=token, endpoint=endpoint, private=private,
                   commit_message=commit_message or "Upload hfqat packed model", secrets=secrets)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    tokenizer: Any = None,
    token: str | None = None,
    private: bool | None = None,
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    endpoint: str | None = None,
    commit_message: str | None = None,
    plots: Sequence[str | os.PathLike] | None = None,
    training_args: Any = None,
    reproduce_command: str | Sequence[str] | None = None,
    base_model: str | None = None,
    local_dir: str | os.PathLike | None = None,
) -> str:
    """Pack `model`, write its model card, upload both to `repo_id`; returns the repo URL.

    Args:
        model: a trained hfqat model (fake-quantized layers).
        repo_id: "namespace/name" on the Hub (or the endpoint).
        tokenizer: saved next to the weights when given.
        token: write token; default: huggingface_hub's (HF_TOKEN or the saved login). Never logged.
        private: create the repo private (ignored when it exists).
        metrics, plots, training_args, reproduce_command, base_model: card content, see `write_model_card`.
        endpoint: Hub URL; default: the HF_ENDPOINT environment variable (read at call time), else huggingface.co.
        commit_message: default "Upload hfqat packed model".
        local_dir: where the export is written and kept; save_packed replaces this folder as a whole. Default:
            a temporary folder, removed after a successful upload and kept (its path is in the error) after a
            failed one.

    Raises:
        HubUploadError: the endpoint answered an error or could not be reached; retrying is safe.
    """
    from ..export.packed import save_packed

    # Check inputs before the (slow) packing.
    plot_paths = _check_plots(plots)
    _metrics_table(metrics)
    temp_root = None
    if local_dir is None:
        temp_root = Path(tempfile.mkdtemp(prefix="hfqat-push-"))
        local_dir = temp_root / repo_id.split("/")[-1]
    local_dir = Path(local_dir)
    inside = [str(p) for p in plot_paths if local_dir.resolve() in p.resolve().parents]
    if inside:
        raise ValueError(f"plots {inside} lie inside local_dir={str(local_dir)!r}, which save_packed replaces; "
                         "pass plots from another folder (e.g. the training output dir)")
    secrets = _secrets(token)
    try:
        save_packed(model, local_dir, tokenizer=tokenizer)
        write_model_card(
            model, local_dir, repo_id=repo_id, metrics=metrics, plots=plots, training_args=training_args,
            reproduce_command=reproduce_command, base_model=base_model, redact=secrets,
        )
    except BaseException:
        if temp_root is not None:  # nothing worth keeping yet
            shutil.rmtree(temp_root, ignore_errors=True)
        raise
    url = _upload(local_dir, repo_id, token=token, endpoint=endpoint, private=private,
                  commit_message=commit_message or "Upload hfqat packed model", secrets=secrets)
    if temp_root is not None:
        shutil.rmtree(temp_root, ignore_errors=True)
    return url


def _upload(local_dir: Path, repo_id: str, *, token: str | None, endpoint: str | None, private: bool | None,
            commit_message: str, secrets: list[str]) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    # Read HF_ENDPOINT now: huggingface_hub reads it once at import, which may predate the user setting it.
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    api = HfApi(endpoint=endpoint)
    logger.info("hfqat: uploading %s to %s at %s", local_dir, repo_id, api.endpoint)
    try:
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=local_dir, token=token, commit_message=commit_message,
                          delete_patterns=STALE_WEIGHT_PATTERNS)
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        detail = err.server_message or str(err).splitlines()[0]
        raise _upload_error(status, detail, local_dir, repo_id, api.endpoint, secrets) from None
    except _transport_errors() as err:
        raise _upload_error(None, f"{type(err).__name__}: {err}", local_dir, repo_id, api.endpoint, secrets) from None
    logger.info("hfqat: uploaded %s", url)
    return url


_STATUS_HINTS = {
    401: "the token was rejected: pass a valid write token (token= or HF_TOKEN, or `hf auth login`)",
    403: "the token may not write to this namespace",
    404: "the repo or endpoint was not found: check repo_id and endpoint",
    None: "the endpoint could not be reached: check the network and HF_ENDPOINT / endpoint=",
}


def _upload_error(status: int | None, detail: str, local_dir: Path, repo_id: str, endpoint: str,
                  secrets: list[str]) -> HubUploadError:
    hint = _STATUS_HINTS.get(status, "the Hub had a server error; retry later" if (status or 0) >= 500 else "")
    message = (
        f"Upload of {repo_id!r} to {endpoint} failed (HTTP {status if status is not None else 'n/a'}: {detail})"
        f"{'; ' + hint if hint else ''}. The local export is intact at {local_dir}; retry with "
        f"hfqat.hub.push.push_packed_dir({str(local_dir)!r}, {repo_id!r}) or `hfqat push`."
    )
    return HubUploadError(_scrub(message, secrets), status_code=status, local_dir=local_dir, repo_id=repo_id,
                          endpoint=endpoint)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    errors: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except ImportError:
            continue
    return tuple(errors)
