"""Optimizers, chosen by `LoopConfig.optimizer`.

"adamw": AdamW, weight decay on matrices only.
"muon":  Muon (Jordan et al. 2024) for the hidden weight matrices: SGD momentum whose update is
         orthogonalised by a Newton-Schulz iteration, so every direction of a matrix moves at
         the same rate. Stacks of expert matrices (experts, out, in) are orthogonalised one
         matrix at a time. The update is scaled by 0.2 * sqrt(max(out, in)) (Liu et al. 2025,
         "Muon is scalable"), which gives it AdamW's update RMS: the same `lr` serves both
         parts and transfers across widths. Embeddings, the output head and vector parameters
         (norm gains, biases) stay with AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from frontierlm.config import LoopConfig
from frontierlm.train.schedule import peak_lr

# Quintic Newton-Schulz coefficients that maximise the slope at zero (Keller Jordan's Muon).
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)


def orthogonalise(update: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximation of U V^T for update = U S V^T, per matrix over the last two dims, in
    bf16 (the iteration tolerates it, and it is what makes Muon cheap)."""
    a, b, c = NS_COEFFICIENTS
    x = update.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    # addmm for one matrix (the very ops of torch.optim.Muon), baddbmm for a stack.
    if x.dim() == 2:
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        shape = x.shape
        x = x.reshape(-1, *shape[-2:])
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        x = x.view(shape)
    return x.mT if tall else x


def _orthogonalise_whole(update: torch.Tensor, steps: int) -> torch.Tensor:
    """`orthogonalise` of the whole matrix also when FSDP2 shards it (a DTensor): every process
    gathers the full update, orthogonalises it and keeps its own rows. The redundant work is
    small next to the model's; spreading matrices over processes can come later."""
    from torch.distributed.tensor import DTensor, distribute_tensor  # see parallel.apply_fsdp

    if not isinstance(update, DTensor):
        return orthogonalise(update, steps)
    whole = orthogonalise(update.full_tensor(), steps)
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)


class Muon(torch.optim.Optimizer):
    """Muon for matrices and stacks of matrices (ndim >= 2)."""

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "ns_steps": ns_steps,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon takes matrices; got a parameter of shape {p.shape}")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = _orthogonalise_whole(update, group["ns_steps"])
                scale = 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))
                p.mul_(1 - lr * decay)
                p.add_(update.to(p.dtype), alpha=-lr * scale)
        return loss


class Optimizers:
    """Several optimizers stepped as one: the loop sets the learning rate through
    `param_groups`, and a checkpoint holds every optimizer's state."""

    def __init__(self, **optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def check_names(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(
                f"checkpoint holds optimizer state for {sorted(state)}, this run uses "
                f"{sorted(self.optimizers)}: resume with the optimizer it was saved with"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_names(state)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def _adamw(groups: list[dict[str, Any]], cfg: LoopConfig, on_cuda: bool) -> torch.optim.AdamW:
    # One fused kernel per step on GPU; on CPU the multi-tensor path avoids a Python loop of
    # small elementwise ops per parameter.
    return torch.optim.AdamW(
        groups,
        lr=peak_lr(cfg),
        betas=(cfg.beta1, cfg.beta2),
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )


def build_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer | Optimizers:
    """The optimizer `cfg.optimizer` names, over `model`'s trainable parameters."""
    on_cuda = next(model.parameters()).is_cuda
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Norm gains are scale parameters; decaying them toward 0 fights the normalisation.
    vectors = [p for _, p in named if p.dim() < 2]
    if cfg.optimizer == "adamw":
        matrices = [p for _, p in named if p.dim() >= 2]
        groups = [
            {"params": matrices, "weight_decay": cfg.weight_decay},
            {"params": vectors, "weight_decay": 0.0},
        ]
        return _adamw(groups, cfg, on_cuda)
    # Embedding rows and output-head rows are per-token lookups, not a linear map to
    # orthogonalise: they stay with AdamW, as in Muon's reference setup.
    io_names = ("embed_tokens", "lm_head")
    io = [p for n, p in named if p.dim() >= 2 and n.startswith(io_names)]
    hidden = [p for n, p in named if p.dim() >= 2 and not n.startswith(io_names)]
    adamw = _adamw(
        [
            {"params": io, "weight_decay": cfg.weight_decay},
            {"params": vectors, "weight_decay": 0.0},
        ],
        cfg,
        on_cuda,
    )
    muon = Muon(hidden, lr=peak_lr(cfg), momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
    return Optimizers(adamw=adamw, muon=muon)
