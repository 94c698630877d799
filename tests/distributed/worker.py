"""Worker launched by tests/distributed/test_distributed.py under torchrun (2 processes, gloo, CPU).

Every rank trains the same patched tiny LLaMA on its half of one global batch (DDP or FSDP2); rank 0
also trains a single-process copy on the whole batch and writes what the tests check to
``<out>/results.json``. Run by hand:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/worker.py \\
        --mode fsdp --out /tmp/fa-dist
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: tiny_models, helpers
sys.path.insert(0, str(HERE.parent.parent))  # the repo, when fastadapt is not installed

from helpers import norm_rel_err, randomize_adapters  # noqa: E402
from tiny_models import tiny_model, tokens  # noqa: E402

import fastadapt as fa  # noqa: E402
from fastadapt import distributed as fad  # noqa: E402
from fastadapt.io import adapter_state_dict  # noqa: E402

STEPS = 3
LR = 1e-2
GLOBAL_BATCH, SEQ = 4, 12


def patched(dtype=torch.float32, method="lora"):
    model = tiny_model("llama", dtype=dtype).train()
    fa.patch(model, method, r=4, alpha=8, targets="all-linear", dropout=0.0)
    return model


def train(model, ids, steps=STEPS):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def snapshot(model) -> dict:
    """Full adapter tensors (gathered when sharded: every rank calls), copied out of the model."""
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def compare(got: dict, want: dict, init: dict) -> dict:
    """Max relative error of the trained adapters and the smallest relative update."""
    assert got.keys() == want.keys() == init.keys(), (sorted(got)[:3], sorted(want)[:3])
    errs = {k: norm_rel_err(got[k], want[k]) for k in want}
    updates = {k: norm_rel_err(want[k], init[k]) if init[k].abs().sum() > 0 else float(want[k].norm()) for k in want}
    worst = max(errs, key=errs.get)
    return {"max_rel_err": errs[worst], "worst_key": worst, "min_update": min(updates.values()), "n": len(errs)}


def count_group_calls(results: dict) -> None:
    """Count the shared-input group's fused calls (q/k/v and gate/up in one op: Triton backend)."""
    import fastadapt.modules.lora as lora_module

    inner = lora_module.lora_linear_group
    results["group_calls"] = 0

    def counted(*args, **kwargs):
        results["group_calls"] += 1
        return inner(*args, **kwargs)

    lora_module.lora_linear_group = counted


def run(args, rank: int, world: int, out: Path, results: dict) -> None:
    count_group_calls(results)
    ids = tokens(GLOBAL_BATCH, SEQ, seed=3)
    local = ids.chunk(world)[rank]
    probe = tokens(2, 9, seed=5)

    # Rank 0 writes a randomised initial adapter; every rank loads it into a fresh model before
    # sharding / wrapping (the supported order: fa.load_adapter, then shard).
    init_dir = out / "init"
    if rank == 0:
        model0 = patched(method=args.method)
        randomize_adapters(model0, seed=7, scale=0.1)
        fa.save_adapter(model0, init_dir)
    dist.barrier()
    model = tiny_model("llama").train()
    fa.load_adapter(model, init_dir)
    init = snapshot(model)
    reference = copy.deepcopy(model) if rank == 0 else None

    if args.mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        results["losses"] = train(wrapped, local)
        trained = snapshot(wrapped)
        fa.save_adapter(wrapped, out / "trained")  # every rank calls; rank 0 writes
        dist.barrier()
    else:
        fad.shard_model(model)
        results["sharded"] = fad.is_sharded(model)
        results["class"] = type(model).__name__
        results["losses"] = train(model, local)
        results["group_calls_sharded"] = results["group_calls"]  # before rank 0's reference run
        trained = snapshot(model)  # collective gather
        fa.save_adapter(model, out / "trained")
        try:
            fa.merge(model)
            results["merge_error"] = None
        except RuntimeError as e:
            results["merge_error"] = str(e)
        fa.export(model, out / "export")  # collective gather, rank 0 writes
        model.eval()
        with torch.no_grad():
            results_logits = model(input_ids=probe).logits  # every rank: FSDP forward is collective
        if rank == 0:
            torch.save(results_logits, out / "sharded_logits.pt")
        # reloading an adapter into the sharded, patched model scatters it to the shards
        fa.load_adapter(model, init_dir)
        reloaded = snapshot(model)
        results["reload_into_sharded_err"] = max(norm_rel_err(reloaded[k], init[k]) for k in init)

    if rank == 0:
        results["ref_losses"] = train(reference, ids)
        want = snapshot(reference)
        results.update(compare(trained, want, init))
        fresh = tiny_model("llama")
        fa.load_adapter(fresh, out / "trained")
        reference.eval()
        with torch.no_grad():
            ref_logits = reference(input_ids=probe).logits
            loaded_logits = fresh(input_ids=probe).logits
        results["loaded_logits_err"] = norm_rel_err(loaded_logits, ref_logits)
        if args.mode == "fsdp":
            from transformers import AutoModelForCausalLM

            sharded_logits = torch.load(out / "sharded_logits.pt")
            results["sharded_vs_loaded_logits_err"] = norm_rel_err(sharded_logits, loaded_logits)
            exported = AutoModelForCausalLM.from_pretrained(out / "export").eval()
            results["export_architectures"] = exported.config.architectures
            with torch.no_grad():
                results["export_logits_err"] = norm_rel_err(exported(input_ids=probe).logits, loaded_logits)

    if args.mode == "fsdp" and args.extra:
        run_bf16(rank, world, ids, local, results)
        run_bad_sharding(results)


def run_bf16(rank, world, ids, local, results) -> None:
    """bf16 frozen base + fp32 adapters in one FSDP unit (torch >= 2.8), no MixedPrecisionPolicy."""
    model = patched(torch.bfloat16)
    randomize_adapters(model, seed=11, scale=0.1)
    init = snapshot(model)
    reference = copy.deepcopy(model) if rank == 0 else None
    try:
        fad.shard_model(model)
    except TypeError as e:  # torch < 2.8: one dtype per unit
        results["bf16"] = {"skipped": str(e)}
        return
    losses = train(model, local)
    trained = snapshot(model)
    dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if p.requires_grad})
    if rank == 0:
        ref_losses = train(reference, ids)
        r = compare(trained, snapshot(reference), init)
        r.update(losses=losses, ref_losses=ref_losses, adapter_dtypes=dtypes)
        results["bf16"] = r


def run_bad_sharding(results) -> None:
    """A frozen base layer sharded as its own unit is never gathered (LoraLinear reads its weight
    without calling it): the forward must fail rather than compute on a shard."""
    model = patched()
    fully_shard = fad.fully_shard_fn()
    fully_shard(model.model.layers[0].self_attn.q_proj.base_layer)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        model(input_ids=tokens(2, 5))
        results["bad_sharding_error"] = None
    except Exception as e:  # noqa: BLE001 - any error is the point; record its text
        results["bad_sharding_error"] = f"{type(e).__name__}: {e}"[:500]
    # The failed forward may leave FSDP's all-gathers in flight: let them finish on both ranks
    # before the process group is torn down (gloo aborts on pending work at destroy).
    dist.barrier()


def broadcast_case_before_init(rank: int):
    """A DoRA model whose adapter differs per rank, evaluated without gradients *before* the process
    group exists (a single-process run then: its row norms are cached)."""
    model = patched(method="dora").eval()
    randomize_adapters(model, seed=100 + rank, scale=0.2)
    with torch.no_grad():
        return model, model(input_ids=tokens(2, 9, seed=5)).logits


def run_ddp_broadcast(model, before: torch.Tensor, rank: int, results: dict) -> None:
    """DDP's construction broadcasts rank 0's parameters into the others' in place (no version bump
    guaranteed): every rank's next no-grad forward must give rank 0's logits, which rank 0 checks
    against a model that never ran a forward."""
    probe = tokens(2, 9, seed=5)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    with torch.no_grad():
        logits = wrapped(input_ids=probe).logits
    gathered = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, logits)
    gathered_before = [torch.empty_like(before) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered_before, before)
    if rank == 0:
        fresh = patched(method="dora").eval()
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            want = fresh(input_ids=probe).logits
        results["broadcast_logits_err"] = max(float((g - want).abs().max()) for g in gathered)
        results["broadcast_ranks_differed"] = not torch.equal(gathered_before[0], gathered_before[1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--extra", action="store_true", help="fsdp: also the bf16 and bad-sharding checks")
    parser.add_argument("--method", choices=["lora", "dora"], default="lora", help="the adapter trained")
    args = parser.parse_args()
    torch.manual_seed(0)
    before_init = broadcast_case_before_init(int(os.environ["RANK"])) if args.mode == "ddp" else None
    torch.manual_seed(0)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    results: dict = {"world": world, "torch": torch.__version__, "backend": os.environ.get("FASTADAPT_BACKEND", "auto")}
    code = 0
    try:
        run(args, rank, world, out, results)
        if before_init is not None:
            run_ddp_broadcast(*before_init, rank, results)
    except Exception:
        results["error"] = traceback.format_exc()
        print(f"[rank {rank}] " + results["error"], file=sys.stderr, flush=True)
        code = 1
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if code == 0:
        dist.barrier()  # no rank tears the group down while another still has collectives queued
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
