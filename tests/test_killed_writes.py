"""Fault tests: a writer killed (SIGKILL) at random points of ``fa.save_adapter``, ``fa.export`` and a
patched model's ``save_pretrained``. The target is then the old version or the new one (never a
mix that loads silently wrong), the base model never changes, and the next write succeeds and
removes what the killed one left.

The writer is a forked child that writes version A, then B, then A ... without pause, so the kill
(after a random delay from a seeded generator) lands inside some write; the target must then be A
or B. Forking (not a fresh interpreter, ~7 s of imports on the CI machine) keeps a kill point cheap.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time

import pytest
import torch
import tqdm
import tqdm.auto
from helpers import randomize_adapters
from safetensors.torch import load_file
from tiny_models import tiny_model, tokens
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import fastadapt as fa

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

KILLS = 4  # kill points per scenario
IDS = tokens()


def kills(write_a, write_b, *, seed: int):
    """Yield after each of KILLS runs of a child that alternates ``write_a()`` / ``write_b()`` until
    SIGKILLed after a random delay; a child that failed (exited by itself) fails the test."""
    rng = random.Random(seed)
    for _ in range(KILLS):
        pid = os.fork()
        if pid == 0:  # the writer: never returns into pytest
            try:
                torch.set_num_threads(1)
                # tqdm's lock is a multiprocessing semaphore shared with the parent: a child killed
                # holding it would block the parent's next progress bar for ever. No bars, own locks.
                hf_logging.disable_progress_bar()
                for cls in (tqdm.tqdm, tqdm.auto.tqdm):
                    cls.set_lock(threading.RLock())
                while True:
                    write_a()
                    write_b()
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the writer failed before the kill"
        yield


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def digests(folder, names=None):
    """sha256 of the files of ``folder`` (of ``names`` only when given: a missing one fails)."""
    names = names or sorted(p.name for p in folder.iterdir() if p.is_file())
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


def which(got, versions: dict) -> str:
    for name, want in versions.items():
        if torch.allclose(got, want, rtol=0, atol=1e-6):
            return name
    raise AssertionError("the target is neither the old nor the new version")


def leftovers(folder, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture
def base_folder(tmp_path):
    folder = tmp_path / "base"
    tiny_model("llama").save_pretrained(folder)
    return folder


def two_versions(base_folder, **options):
    """The base model patched twice with different adapter weights (``options`` per version)."""
    models = []
    for seed, extra in enumerate([options.get("a", {}), options.get("b", {})]):
        model = AutoModelForCausalLM.from_pretrained(base_folder)
        fa.patch(model, "lora", **{"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], **extra})
        randomize_adapters(model, seed=seed)
        models.append(model.eval())
    return models


def loaded(path):
    """The adapter at ``path`` loaded into the base model (built again: from_pretrained of the base
    folder would attach the adapter saved there through PEFT)."""
    return logits(fa.load_adapter(tiny_model("llama"), path))


@pytest.mark.parametrize("alphas", [(8, 8), (8, 32)], ids=["same-options", "other-options"])
def test_kill_during_save_adapter(base_folder, tmp_path, alphas):
    a, b = two_versions(base_folder, a={"alpha": alphas[0]}, b={"alpha": alphas[1]})
    base = digests(base_folder)
    target = tmp_path / "adapter"
    (tmp_path / "adapter").mkdir()
    (target / ".adapter_model.safetensors.notes").write_text("not ours")  # never touched
    fa.save_adapter(a, target)
    versions = {"A": logits(a), "B": logits(b)}
    seen = set()
    for _ in kills(lambda: fa.save_adapter(a, target), lambda: fa.save_adapter(b, target), seed=1):
        try:
            seen.add(which(loaded(target), versions))
        except ValueError as e:  # new weights beside the old config: refused, naming what differs
            assert alphas[0] != alphas[1] and "the save was interrupted" in str(e), e
            seen.add("refused")
        assert digests(base_folder, base) == base
    fa.save_adapter(b, target)  # the next write succeeds and cleans up
    assert which(loaded(target), versions) == "B"
    assert leftovers(target, "adapter_model.safetensors") == [".adapter_model.safetensors.notes"]
    assert leftovers(target, "adapter_config.json") == []
    assert seen  # at least one kill point checked


def test_kill_during_export(base_folder, tmp_path):
    a, b = two_versions(base_folder)
    base = digests(base_folder)
    target = tmp_path / "merged"
    fa.export(a, target)
    versions = {"A": logits(a), "B": logits(b)}
    for _ in kills(lambda: fa.export(a, target, overwrite=True), lambda: fa.export(b, target, overwrite=True), seed=2):
        which(logits(AutoModelForCausalLM.from_pretrained(target).eval()), versions)  # loads, complete
        assert digests(base_folder, base) == base
    fa.export(b, target, overwrite=True)
    assert which(logits(AutoModelForCausalLM.from_pretrained(target).eval()), versions) == "B"
    assert leftovers(tmp_path, "merged") == []


def test_kill_during_gguf_export(tmp_path):
    """A GGUF export killed at any point: the file is the old version or the new one, whole."""
    from tiny_tokenizers import gguf_model, tiny_tokenizer

    tok = tiny_tokenizer("gpt-2")
    ids = torch.tensor([tok("Natalia sold 48 clips in April.")["input_ids"]])
    models = []
    for seed in (0, 1):
        model = gguf_model("llama", vocab_size=len(tok))
        fa.patch(model, "lora", r=4, alpha=8, targets=["q_proj", "v_proj"])
        randomize_adapters(model, seed=seed)
        models.append(model.eval())
    target = tmp_path / "model.gguf"

    def export(model):
        fa.export(model, target, format="gguf", quant="f32", tokenizer=tok, overwrite=True)

    def read():
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=target.name).eval()(ids).logits

    versions = {}
    for name, model in zip("BA", models[::-1]):  # each version as read back; A is on disk last
        export(model)
        versions[name] = read()
    for _ in kills(lambda: export(models[0]), lambda: export(models[1]), seed=4):
        which(read(), versions)  # loads, complete
    export(models[1])
    assert which(read(), versions) == "B"
    assert leftovers(tmp_path, "model.gguf") == []


def test_kill_during_save_pretrained(base_folder, tmp_path):
    """Into the base model's own folder (its files never change) and into a checkpoint folder (each
    file the old or the new version; model.safetensors is what Trainer's resume reads)."""
    a, b = two_versions(base_folder)
    base = digests(base_folder)
    ckpt = tmp_path / "checkpoint-2"
    a.save_pretrained(ckpt)
    trainer_weights = {"A": load_file(ckpt / "model.safetensors"), "B": None}
    b.save_pretrained(tmp_path / "b")
    trainer_weights["B"] = load_file(tmp_path / "b" / "model.safetensors")
    versions = {"A": logits(a), "B": logits(b)}

    def save(model):
        model.save_pretrained(base_folder)
        model.save_pretrained(ckpt)

    for _ in kills(lambda: save(a), lambda: save(b), seed=3):
        assert digests(base_folder, base) == base
        if (base_folder / "adapter_config.json").exists():
            which(loaded(base_folder), versions)
        which(loaded(ckpt), versions)
        weights = load_file(ckpt / "model.safetensors")
        assert any(all(torch.equal(weights[k], w[k]) for k in w) and weights.keys() == w.keys()
                   for w in trainer_weights.values())
    save(b)
    assert which(loaded(ckpt), versions) == "B" == which(loaded(base_folder), versions)
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]
    assert not [p for p in base_folder.iterdir() if p.name.startswith(".")]
