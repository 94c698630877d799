"""Writes lose nothing: a patched model's save_pretrained never overwrites (or shadows) a model's
weights, a writer's stale temporaries are cleaned by the next write to the same target and nothing
else is touched, files and folders get the permissions the umask gives (as transformers' own config
files), and an export through a symlink writes the link's target."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
from helpers import randomize_adapters
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model, tokens
from transformers import AutoModelForCausalLM

import fastadapt as fa
from fastadapt import _files


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def logits(model):
    with torch.no_grad():
        return model(tokens()).logits


@pytest.fixture
def base_folder(tmp_path):
    folder = tmp_path / "base"
    tiny_model("llama").save_pretrained(folder)
    return folder


def patched_from(folder, seed=0):
    model = AutoModelForCausalLM.from_pretrained(folder)
    fa.patch(model, "lora", r=4, targets="all-linear")
    randomize_adapters(model, seed=seed)
    return model.eval()


def test_save_pretrained_into_the_base_model_folder_leaves_the_model(base_folder, caplog):
    before = digests(base_folder)
    model = patched_from(base_folder)
    with caplog.at_level("WARNING", logger="fastadapt.io"):
        model.save_pretrained(base_folder)
    assert "holds a model (config.json)" in caplog.text
    after = digests(base_folder)
    assert {k: after[k] for k in before} == before  # config.json and model.safetensors untouched
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(after)
    # transformers reloads the folder as base + adapter (through PEFT): the fine-tuned model, not a random one
    reloaded = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    assert torch.allclose(logits(reloaded), logits(model), rtol=1e-5, atol=1e-6)
    assert torch.equal(load_file(base_folder / "model.safetensors")["lm_head.weight"], model.lm_head.weight)


def test_trainer_save_model_into_the_base_model_folder_leaves_the_model(base_folder, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    before = digests(base_folder)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=patched_from(base_folder), args=args).save_model(str(base_folder))
    after = digests(base_folder)
    assert {k: after[k] for k in before} == before and "adapter_model.safetensors" in after


def test_save_pretrained_never_shadows_a_sharded_model(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text("{}")  # from_pretrained would read model.safetensors first
    fa.patch(tiny_model("llama"), "lora", r=2).save_pretrained(folder)
    assert not (folder / "model.safetensors").exists()


def test_save_pretrained_replaces_its_own_adapter_only_weights(tmp_path):
    """A checkpoint folder saved again (ours, marked or holding only adapter keys) is rewritten."""
    model = fa.patch(tiny_model("llama"), "lora", r=2)
    model.save_pretrained(tmp_path)
    first = load_file(tmp_path / "model.safetensors")
    randomize_adapters(model, seed=3)
    model.save_pretrained(tmp_path)
    second = load_file(tmp_path / "model.safetensors")
    assert not torch.equal(next(iter(first.values())), next(iter(second.values())))
    save_file(second, tmp_path / "model.safetensors")  # an earlier fastadapt's file: no marker, adapter keys only
    randomize_adapters(model, seed=4)
    model.save_pretrained(tmp_path)
    assert not torch.equal(next(iter(load_file(tmp_path / "model.safetensors").values())), next(iter(second.values())))
    save_file({"other.weight": torch.zeros(2)}, tmp_path / "model.safetensors")  # not ours: left alone
    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == {"other.weight"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_write_cleans_stale_temporaries_and_nothing_else(tmp_path):
    model = fa.patch(tiny_model("llama"), "lora", r=2)
    folder = tmp_path / "adapter"
    folder.mkdir()
    dead, alive = _dead_pid(), os.getppid()
    host, other = _files.HOST, "0123abcd" if _files.HOST != "0123abcd" else "4567cdef"
    stale = [folder / f".adapter_model.safetensors.tmp-{host}-{dead}-0a1b2c3d",
             folder / f".adapter_config.json.tmp-{dead}-00ff"]  # no host: this host's (as written before)
    kept = [folder / f".adapter_model.safetensors.tmp-{host}-{alive}-0a1b2c3d",  # a live writer's
            folder / f".adapter_config.json.tmp-{other}-{dead}-0a1b2c3d",  # another host's: its pid means nothing here
            folder / ".adapter_model.safetensors.backup", folder / "notes.txt", folder / ".hidden"]
    legacy_old = folder / ".adapter_model.safetensors.k2j_9x0a.tmp"  # an earlier version's (no pid), 2 days old
    legacy_new = folder / ".adapter_model.safetensors.q8w7e6r5.tmp"  # the same, just written: maybe live
    for p in stale + kept + [legacy_old, legacy_new]:
        p.write_text("x")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(legacy_old, (two_days_ago, two_days_ago))
    stale.append(legacy_old)
    kept.append(legacy_new)
    fa.save_adapter(model, folder)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def test_export_cleans_what_a_killed_export_left_and_restores_a_target_moved_aside(tmp_path):
    model = fa.patch(tiny_model("llama"), "lora", r=2)
    randomize_adapters(model)
    target = tmp_path / "merged"
    fa.export(model, target)
    dead = _dead_pid()
    half = tmp_path / f".merged.new-{dead}-12345678"  # a half-written export
    half.mkdir()
    (half / "model.safetensors").write_text("partial")
    legacy = tmp_path / f".merged.old-{dead}"  # what an earlier version's killed overwrite left
    legacy.mkdir()
    (legacy / "x").write_text("old")
    legacy_half = tmp_path / ".merged.export-a1b2c3d4"  # an earlier version's half-written export, a day old
    legacy_half.mkdir()
    os.utime(legacy_half, (time.time() - 2 * 24 * 3600,) * 2)
    fa.export(model, target, overwrite=True)  # used to fail with "Directory not empty"
    assert not half.exists() and not legacy.exists() and not legacy_half.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    # killed between moving the old export aside and moving the new one in (where no atomic exchange exists)
    os.replace(target, tmp_path / f".merged.old-{dead}-abcdef01")
    with pytest.raises(FileExistsError, match="not empty"):  # the old export is back, and not overwritten
        fa.export(model, target)
    assert (target / "config.json").exists()


def test_replace_dir_swaps_atomically_or_falls_back(tmp_path, monkeypatch):
    for exchange in (True, False):
        if not exchange:
            monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
        dst, src = tmp_path / f"dst{exchange}", tmp_path / f"src{exchange}"
        dst.mkdir()
        (dst / "old").write_text("old")
        src.mkdir()
        (src / "new").write_text("new")
        _files.replace_dir(src, dst)
        assert [p.name for p in dst.iterdir()] == ["new"] and not src.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dstFalse", "dstTrue"]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_written_files_and_folders_get_the_umask_permissions(umask, tmp_path):
    """Every file gets ``0666 & ~umask`` and every folder ``0777 & ~umask``, what transformers'
    save_pretrained gives its config.json. (safetensors >= 0.8 writes model.safetensors 0600 whatever
    the umask, safetensors#782: a plain save_pretrained then leaves its weights unreadable to the
    group; fastadapt's files never are.)"""
    old = os.umask(umask)
    try:
        model = fa.patch(tiny_model("llama"), "lora", r=2)
        fa.save_adapter(model, tmp_path / "adapter")
        model.save_pretrained(tmp_path / "ckpt")
        fa.export(model, tmp_path / "merged")
        reference = tmp_path / "transformers"
        tiny_model("llama").save_pretrained(reference)
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(tmp_path / "merged") == mode(reference) == 0o777 & ~umask  # was 0700 (a renamed mkdtemp)
    assert mode(reference / "config.json") == 0o666 & ~umask
    written = [*(tmp_path / "merged").iterdir(), *(tmp_path / "adapter").iterdir(), *(tmp_path / "ckpt").iterdir()]
    assert "model.safetensors" in {p.name for p in written}
    for p in written:
        assert mode(p) == 0o666 & ~umask, p  # model.safetensors was 0600 (safetensors' own temporary file)


def test_export_through_a_symlink_writes_the_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "disk" / "merged"
    target.mkdir(parents=True)
    (target / "stale.safetensors").write_text("from an earlier export")
    link = tmp_path / "merged-link"
    link.symlink_to(target)
    model = fa.patch(tiny_model("llama"), "lora", r=2)
    randomize_adapters(model)
    fa.export(model, link, overwrite=True)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "merged-link"]  # no temporaries left
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["merged"]
    reloaded = AutoModelForCausalLM.from_pretrained(link).eval()
    assert torch.allclose(logits(reloaded), logits(model.eval()), rtol=1e-5, atol=1e-6)


def test_export_into_the_current_folder_is_refused_saying_why(tmp_path, monkeypatch):
    inside = tmp_path / "here"
    inside.mkdir()
    monkeypatch.chdir(inside)
    model = fa.patch(tiny_model("llama"), "lora", r=2)
    for path in (".", inside, tmp_path):
        with pytest.raises(ValueError, match="is the current directory or holds it: fa.export replaces the whole "
                                             "folder; export into a new folder"):
            fa.export(model, path, overwrite=True)
    assert list(inside.iterdir()) == []


def test_embedded_model_is_recorded_by_its_short_name(tmp_path, monkeypatch):
    """Not the absolute cache path (tests/app/test_embedded_model.py does it on the real model)."""
    from fastadapt import models

    monkeypatch.setenv("FASTADAPT_CACHE_DIR", str(tmp_path / "cache"))
    # the package check passes, but a conversion would fail: the cached folder must be used
    monkeypatch.setattr(models, "embedded_gguf", lambda name: (tmp_path / "no-package", "absent.gguf"))
    tiny_model("llama").save_pretrained(models.settings.cache_dir() / "models" / "smollm2-135m")  # as if converted
    model, _ = models.load_model("smollm2-135m")
    fa.patch(model, "lora", r=2)
    fa.save_adapter(model, tmp_path / "adapter")
    assert fa.io.read_adapter_config(tmp_path / "adapter")["base_model_name_or_path"] == "smollm2-135m"
