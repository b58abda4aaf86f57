"""Where, in what precision and over how many processes a model trains; applied to a built
model, never inside it.

One process: CPU or one GPU. Under `torchrun` (WORLD_SIZE > 1): one process per GPU (NCCL, device
cuda:LOCAL_RANK) or per CPU slot (gloo), data parallel by `run.parallel`:
  "fsdp"  FSDP2 (`fully_shard`): each transformer block, then the root, shards its parameters,
          gradients and optimizer state over the processes; bf16 compute copies of the weights
          on GPU (`MixedPrecisionPolicy`, gradients reduced in fp32), fp32 on CPU.
  "ddp"   DistributedDataParallel: a full replica per process, gradients all-reduced.
  "auto"  FSDP2 when WORLD_SIZE > 1; a single process trains the plain model either way.

The batch is the same global batch at any process count: micro-batch i is split by rows, process
r taking rows r, r+N, r+2N, ... (`rank_rows`), so N processes follow the curve of one.

Within each process, applied in this order to a built model (torchtitan's): float8 linear layers
(train/fp8.py), activation checkpointing per block, torch.compile per block, then the data-parallel
wrapping above.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from frontierlm.config import RunConfig
from frontierlm.console import console

if TYPE_CHECKING:
    from frontierlm.model import Transformer

# Barriers around work that one process does alone (a data stage before training, the final
# model export) wait on this gloo group: its timeout is long, where NCCL's default is minutes.
CONTROL_TIMEOUT = timedelta(hours=24)
_control_group: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that writes logs, metrics, events and single-file artifacts."""
        return self.rank == 0


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_world_size() -> int:
    """The WORLD_SIZE torchrun gives this process (1 when started plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _wants_cuda(run: RunConfig) -> bool:
    if run.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())


def init_distributed(run: RunConfig) -> torch.device:
    """Join the torchrun job once (NCCL on GPU, gloo on CPU) and return this process's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = _wants_cuda(run)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
            "launch at most one process per GPU (torchrun --nproc_per_node)"
        )
    join_process_group(device)
    return device


def join_process_group(
    device: torch.device, store: dist.Store | None = None, rank: int = -1, size: int = -1
) -> None:
    """Make this process a member of the default process group (NCCL on GPU, gloo on CPU):
    from torchrun's environment, or from `store` as process `rank` of `size` (the processes of
    one DiLoCo island, frontierlm/distributed/island.py). Processes other than rank 0 go quiet:
    one console speaks for the group."""
    global _control_group
    if not dist.is_initialized():
        membership = {"store": store, "rank": rank, "world_size": size}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, **membership)
        else:
            dist.init_process_group("gloo", **membership)
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    if dist.get_rank() != 0:
        console.quiet = True


def shutdown_distributed() -> None:
    global _control_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    if world().size > 1:
        dist.barrier(group=_control_group)


def select_device(run: RunConfig) -> torch.device:
    if run.threads:
        torch.set_num_threads(run.threads)
    if launched_world_size() > 1:
        return init_distributed(run)
    if _wants_cuda(run):
        return torch.device("cuda")
    return torch.device("cpu")


def resolved_precision(device: torch.device, precision: str) -> str:
    """ "auto" -> bf16 on GPU, fp32 on CPU; bf16 on a CPU without native bf16 -> fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        # Emulated bf16 matmuls are slower than fp32 and no more accurate: not worth it.
        warn_once("this CPU has no native bf16 (AVX512-BF16/AMX): training in fp32 instead")
        precision = "fp32"
    return precision


@functools.cache
def cpu_has_native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU and, when asked, on CPU; otherwise full fp32. Weights, gradients and
    optimizer state stay fp32: autocast only lowers the matmul inputs."""
    # fp8 layers quantise themselves; everything else runs in bf16 autocast.
    if resolved_precision(device, precision) in ("bf16", "fp8"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def warn_once(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}")


# ----------------------------------------------------------------------------- data parallel


def parallelize(model: Transformer, mode: str, device: torch.device, precision: str) -> nn.Module:
    """The module the loop runs forward and backward through: `model` itself in a single
    process; under torchrun the DDP wrapper around it, or `model` sharded in place by FSDP2
    (then still the same object, of a subclass of its class). `model` must be on `device`."""
    if world().size == 1:
        return model
    if mode == "ddp":
        return apply_ddp(model, device)
    param_dtype = None
    if device.type == "cuda" and resolved_precision(device, precision) in ("bf16", "fp8"):
        param_dtype = torch.bfloat16
    return apply_fsdp(model, param_dtype)


def apply_ddp(model: Transformer, device: torch.device) -> DistributedDataParallel:
    # No buffer broadcast before each forward: MoE expert-load counters are per-process sums
    # that the loop adds up across processes; DDP would overwrite them with rank 0's. (torch
    # 2.13 renames the switch; 2.11 knows only the old name.)
    no_forward_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **no_forward_sync
    )


def apply_fsdp(model: Transformer, param_dtype: torch.dtype | None = None) -> Transformer:
    """FSDP2 per transformer block, then the root (embedding, final norm and head, tied or not,
    in one group). With `param_dtype`, the blocks compute with weights of that dtype while the
    sharded masters, gradients and reductions stay fp32; MoE routers keep fp32 weights (bf16
    near-ties flip expert choices)."""
    # Imported here: FSDP2 and DTensor cost a second of import time that the commands which
    # do not train (data, tokenizer, eval) need not pay.
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from frontierlm.model.moe import MoE

    # FSDP2 takes each process's own full weights as the source of its shard: make them equal
    # (they are, given the seed; this makes it a fact, as DDP does on construction).
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for block in model.layers:
        if param_dtype is not None and isinstance(block.mlp, MoE):
            fully_shard(block.mlp.router, mp_policy=fp32)
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def grad_sync(trained: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP: skip the all-reduce on micro-steps before the last of an accumulation (the
    gradients add up locally). FSDP2 reduce-scatters every micro-step, which keeps unsharded
    gradients from piling up in memory."""
    if not sync and isinstance(trained, DistributedDataParallel):
        return trained.no_sync()
    return contextlib.nullcontext()


def rank_rows(batch: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """This process's rows of a global batch: r, r+N, r+2N, ... Strided rather than blocks, so
    a preference batch (chosen rows, then the same pairs' rejected rows) keeps its pairs."""
    w = world()
    if w.size == 1:
        return batch
    rows = {}
    for key, tensor in batch.items():
        if tensor.shape[0] % w.size:
            raise ValueError(
                f"{where}: a batch of {tensor.shape[0]} rows ({key}) does not split evenly over "
                f"{w.size} processes; use a batch size that divides by {w.size}"
            )
        rows[key] = tensor[w.rank :: w.size].contiguous()
    return rows


def check_batch_split(batch_size: int, key: str) -> None:
    """Fail before any work when the global batch cannot be split evenly over the processes."""
    size = world().size
    if batch_size % size:
        lower, upper = batch_size // size * size, (batch_size // size + 1) * size
        suggest = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"{key}={batch_size} does not divide by the {size} processes of this run "
            f"(WORLD_SIZE): it is the global batch, of which each process takes an equal share; "
            f"use a multiple of {size} (e.g. {suggest}) or another process count"
        )


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_mean(values: Sequence[float]) -> list[float]:
    """The mean of each value over the processes, the same on every process (a NaN anywhere
    makes it NaN everywhere, so every process judges a step alike)."""
    if world().size == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return (tensor / world().size).tolist()


def all_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum tensors over the processes, in place."""
    if world().size == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global gradient norm before clipping (a 0-d tensor, left on the device so the loop
    reads it with the loss in one transfer), clipping to `max_norm`; over sharded (DTensor)
    gradients the norm is the full one, the same on every process."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    if not any(isinstance(p.grad, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# ----------------------------------------------------------------------------- memory and speed

# Selective checkpointing keeps these ops' outputs and recomputes everything else in a block
# (norms, activations, rotary embedding, casts): the costly products are not redone.
_KEPT_BY_SELECTIVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_mm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}
if hasattr(torch.ops.aten, "_grouped_mm"):
    _KEPT_BY_SELECTIVE.add(torch.ops.aten._grouped_mm.default)


def _keep_products(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _KEPT_BY_SELECTIVE:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Recompute activations in the backward pass instead of keeping them, per block, in place
    (parameter names and checkpoints are unchanged): `block` keeps only each block's input,
    `selective` also its matmul and attention outputs (about a third of a block's activation
    memory, for most of the saving at a few percent of the compute)."""
    if mode == "none":
        return
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    def contexts():
        return create_selective_checkpoint_contexts(_keep_products)

    for block in model.layers:
        forward = block.forward

        def checkpointed(*args, forward=forward):
            if mode == "selective":
                return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts)
            return checkpoint(forward, *args, use_reentrant=False)

        block.forward = checkpointed


def compile_mode(device: torch.device, setting: str) -> str:
    """ "auto" -> "blocks" on GPU, "none" on CPU (compiling costs more than it saves on small
    CPU runs)."""
    if setting == "auto":
        return "blocks" if device.type == "cuda" else "none"
    return setting


def apply_compile(model: Transformer, device: torch.device, setting: str) -> None:
    """Regional compilation: each transformer block compiles in place (`Module.compile`, so names
    are unchanged) and, as the blocks share their code, one compilation serves them all: start-up
    stays seconds at any depth. The loss compiles too (train/losses.py), which keeps the
    vocabulary-wide logits from being materialised in fp32."""
    from frontierlm.train import losses

    mode = compile_mode(device, setting)
    if mode == "none":
        losses.compile_losses(False)
        return
    if mode == "model":
        # One graph for the whole forward: fusions across block boundaries (residual add into
        # the next norm) and one backward graph, for a start-up that grows with depth.
        model.compile()
    else:
        for block in model.layers:
            block.compile()
    losses.compile_losses(True)
