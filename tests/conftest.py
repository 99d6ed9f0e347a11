"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hf_gradmimic.testing.hub_server import DEFAULT_TOKEN, HubServer


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A loopback Hub (``hf_gradmimic.testing.hub_server``) that the real clients talk to for one test.

    Sets HF_ENDPOINT, a valid HF_TOKEN, a temporary HF_HOME, HF_HUB_DISABLE_XET=1 (otherwise
    uploads go through Xet, which the server does not emulate) and HF_HUB_DISABLE_TELEMETRY=1,
    and makes sure offline mode is off.
    """
    server = HubServer(tmp_path / "hub-storage").start()
    home = tmp_path / "hf-home"
    env = {
        "HF_ENDPOINT": server.url,
        "HF_TOKEN": DEFAULT_TOKEN,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HUB_OFFLINE": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)
    _point_imported_clients_at(server.url, home, monkeypatch)
    try:
        yield server
    finally:
        server.stop()
        _forget_cached_filesystems()


def _point_imported_clients_at(url: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redo what the clients compute from the environment at import time.

    huggingface_hub.constants and datasets.config copy HF_ENDPOINT, HF_HOME, HF_HUB_DISABLE_XET...
    into module attributes when first imported, and the clients read those attributes (not the
    environment) at call time. Whichever test imported them first would otherwise decide where
    every later test talks to. Setting these attributes is configuration, exactly what the
    environment variables would have set: no client method is replaced, every call still goes
    through the real client code and real HTTP. monkeypatch restores them after the test.

    Both modules are imported here on purpose, so that their import-time values are taken (and
    later restored) around the test rather than frozen to this test's server forever.
    """
    from huggingface_hub import constants, hf_api, hf_file_system

    hub_cache = str(home / "hub")
    for name, value in {
        "ENDPOINT": url,
        # hf_hub_url() builds download URLs from this template, not from ENDPOINT.
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": str(home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
    }.items():
        monkeypatch.setattr(constants, name, value)
    # Module-level client instances (behind huggingface_hub.upload_file, create_repo, ... and the
    # default HfFileSystem) captured the endpoint when they were built.
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(hf_file_system.hffs, "endpoint", url)
    monkeypatch.setattr(hf_file_system.hffs._api, "endpoint", url)
    _forget_cached_filesystems()

    if importlib.util.find_spec("datasets") is not None:
        from datasets import config as ds_config

        datasets_cache = home / "datasets"
        for name, value in {
            "HF_ENDPOINT": url,
            "HUB_DATASETS_URL": url + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_CACHE_HOME": str(home),
            "HF_DATASETS_CACHE": datasets_cache,
            "HF_MODULES_CACHE": home / "modules",
            "DOWNLOADED_DATASETS_PATH": datasets_cache / "downloads",
            "EXTRACTED_DATASETS_PATH": datasets_cache / "downloads" / "extracted",
            "HF_HUB_OFFLINE": False,
            "HF_DATASETS_OFFLINE": False,
        }.items():
            monkeypatch.setattr(ds_config, name, value)
    # transformers reads huggingface_hub.constants at call time; its only import-time copy is
    # HF_MODULES_CACHE (remote code), which these tests do not use.
    if "transformers.utils.hub" in sys.modules:
        transformers_hub = sys.modules["transformers.utils.hub"]
        monkeypatch.setattr(transformers_hub, "HF_MODULES_CACHE", str(home / "modules"))
        # transformers keeps one HfApi built with the endpoint current at the time: rebuild it.
        if hasattr(transformers_hub, "_hf_api"):
            monkeypatch.setattr(transformers_hub, "_hf_api", None)
    os.makedirs(home, exist_ok=True)


def _forget_cached_filesystems() -> None:
    # fsspec keeps HfFileSystem instances (and their directory listings) per constructor
    # arguments; one built with the default endpoint would outlive this test's server.
    from huggingface_hub import HfFileSystem

    HfFileSystem.clear_instance_cache()
