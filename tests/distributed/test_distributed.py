"""DDP and FSDP2 with fastadapt: 2 processes on CPU (gloo), launched with torchrun from pytest.

Each launch runs ``worker.py`` once; rank 0 trains a single-process copy on the whole global batch
and writes ``results.json``, which the tests below check. ~10-25 s per launch on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORKER = HERE / "worker.py"
NPROC = 2
TIMEOUT_S = 300
TOL = 1e-5  # fp32: relative (norm-wise) error of every trained adapter tensor vs one process


def torchrun(out: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run the worker under torchrun (standalone rendezvous on a free port); return rank 0's results."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
        "--max_restarts=0", str(WORKER), "--out", str(out), *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    for attempt in (1, 2):
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks (own session)
            log, _ = proc.communicate()
            pytest.fail(f"torchrun timed out after {TIMEOUT_S}s:\n{log[-4000:]}")
        results_file = out / "results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        # gloo on a loaded 2-core machine rarely aborts a rank while connecting ("terminate called
        # without an active exception", no Python error): launch once more. A worker that reports a
        # Python error, or fails twice, fails the test.
        crashed = proc.returncode != 0 and not results and "terminate called" in log
        if crashed and attempt == 1:
            continue
        break
    if proc.returncode != 0 or "error" in results:
        pytest.fail(f"torchrun exited {proc.returncode}:\n{results.get('error', '')}\n{log[-4000:]}")
    return results


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("ddp"), "--mode", "ddp", env={"FASTADAPT_BACKEND": "torch"})


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return torchrun(out, "--mode", "fsdp", "--extra", env={"FASTADAPT_BACKEND": "torch"}) | {"out": str(out)}


@pytest.fixture(scope="module")
def fsdp_dora(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-dora")
    return torchrun(out, "--mode", "fsdp", "--method", "dora", env={"FASTADAPT_BACKEND": "torch"}) | {"out": str(out)}


@pytest.fixture(scope="module")
def fsdp_triton(tmp_path_factory):
    pytest.importorskip("triton")
    env = {"FASTADAPT_BACKEND": "triton", "TRITON_INTERPRET": "1"}
    return torchrun(tmp_path_factory.mktemp("fsdp-triton"), "--mode", "fsdp", env=env)


def check_matches_one_process(r: dict, tol: float = TOL, tensors_per_layer: int = 2) -> None:
    assert r["world"] == NPROC
    assert r["n"] == 2 * 7 * tensors_per_layer  # 2 layers x 7 linears x (A, B[, magnitude])
    assert r["max_rel_err"] < tol, (r["worst_key"], r["max_rel_err"])
    assert r["min_update"] > 1e-2, "training barely moved some adapter: the comparison would be vacuous"


def test_ddp_trains_like_one_process(ddp):
    check_matches_one_process(ddp)


def test_ddp_saved_adapter_reloads_with_the_same_logits(ddp):
    assert ddp["loaded_logits_err"] < TOL


def test_ddp_broadcast_reaches_dora_norms_cached_before_the_process_group(ddp):
    """Each rank cached DoRA norms of its own adapter before init_process_group; after DDP broadcast
    rank 0's parameters, every rank gives a fresh model's logits (multi-process runs never read a
    cached value)."""
    assert ddp["broadcast_ranks_differed"]
    assert ddp["broadcast_logits_err"] == 0.0


def test_fsdp2_trains_like_one_process(fsdp):
    assert fsdp["sharded"] and fsdp["class"].startswith("FSDP")
    check_matches_one_process(fsdp)


def test_fsdp2_saved_adapter_holds_full_tensors_and_reloads(fsdp):
    from safetensors.torch import load_file

    tensors = load_file(Path(fsdp["out"]) / "trained" / "adapter_model.safetensors")
    shapes = {k.rsplit(".", 2)[-2]: tuple(v.shape) for k, v in tensors.items() if ".q_proj." in k}
    assert shapes == {"lora_A": (4, 48), "lora_B": (48, 4)}  # full (r, in) / (out, r), not a shard
    assert fsdp["loaded_logits_err"] < TOL  # fresh model + saved adapter = one-process model
    assert fsdp["sharded_vs_loaded_logits_err"] < TOL  # = the sharded model itself


def test_fsdp2_export_gathers_and_merge_refuses_with_guidance(fsdp):
    assert fsdp["export_architectures"] == ["LlamaForCausalLM"]  # not FSDPLlamaForCausalLM
    assert fsdp["export_logits_err"] < TOL
    assert "sharded" in fsdp["merge_error"] and "fa.save_adapter" in fsdp["merge_error"]


def test_fsdp2_load_adapter_into_sharded_model(fsdp):
    assert fsdp["reload_into_sharded_err"] == 0.0


def test_fsdp2_bf16_base_with_fp32_adapters(fsdp):
    r = fsdp["bf16"]
    if "skipped" in r:
        pytest.skip(r["skipped"])
    assert r["adapter_dtypes"] == ["torch.float32"]
    # bf16 compute: gradients are rounded per rank before the fp32 reduction, so only close.
    assert r["max_rel_err"] < 5e-2, r
    assert r["min_update"] > 1e-2


def test_fsdp2_never_computes_on_a_shard(fsdp):
    # a base layer sharded as its own unit is never gathered (its forward is not called)
    err = fsdp["bad_sharding_error"]
    assert err is not None and "DTensor" in err


def test_fsdp2_dora_trains_like_one_process_and_exports(fsdp_dora):
    """DoRA's row norms change every step: FSDP2 refills the gathered A and B without moving their
    version counters, so a norm cached across steps would train differently from one process."""
    check_matches_one_process(fsdp_dora, tensors_per_layer=3)
    assert fsdp_dora["loaded_logits_err"] < TOL and fsdp_dora["sharded_vs_loaded_logits_err"] < TOL
    assert fsdp_dora["export_logits_err"] < TOL  # the gathered magnitude, A and B merged


def test_fsdp2_shared_input_group_on_triton(fsdp_triton):
    assert fsdp_triton["group_calls_sharded"] > 0  # q/k/v and gate/up went through the grouped op
    check_matches_one_process(fsdp_triton)
    assert fsdp_triton["loaded_logits_err"] < TOL


def test_train_cli_under_torchrun_uses_the_global_batch(tmp_path):
    """`torchrun -m fastadapt train`: --batch-size is the global batch (each of 2 processes takes half),
    rank 0 alone writes the run's files, and the adapter it writes loads."""
    sys.path.insert(0, str(REPO / "tests" / "app"))  # where test_train_eval_cli lives (also when run alone)
    from test_train_eval_cli import make_tiny_checkpoint, write_train_data

    make_tiny_checkpoint(tmp_path / "base")
    write_train_data(tmp_path / "train.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}
    for attempt in (1, 2):  # one more launch only for the rare gloo abort (see torchrun above)
        # each launch its own folder: an aborted one may have begun its run there, which the CLI
        # then (rightly) refuses to overwrite without --overwrite
        out = tmp_path / f"run{attempt}"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
            "--max_restarts=0", "-m", "fastadapt", "train", "--model", str(tmp_path / "base"),
            "--data", str(tmp_path / "train.jsonl"), "--output", str(out), "--method", "lora",
            "--targets", "q_proj,v_proj", "--lora-r", "4", "--alpha", "8", "--batch-size", "4",
            "--micro-batch-size", "2", "--max-steps", "2", "--cutoff-len", "64", "--seed", "0",
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        if proc.returncode == 0 or "terminate called" not in proc.stdout + proc.stderr or attempt == 2:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((out / "training_config.json").read_text())
    assert config["grad_accum"] == 1  # 4 = 2 per micro-batch x 2 processes x 1 accumulation step
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "loss" in row] == [1, 2]  # one row per step: rank 0 only
    from transformers import AutoModelForCausalLM

    import fastadapt as fa

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    fa.load_adapter(model, out)
