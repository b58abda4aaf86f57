"""FP8 training for linear layers: float8 matmuls through `torch._scaled_mm`, applied to a built
model by `convert_to_float8` (the model code knows nothing of it).

Each converted layer quantises, on every call, its input and weight to float8 e4m3 with a scale
computed from the current absolute maximum ("dynamic" scaling), and multiplies in fp8 with
fp32 accumulation. The backward pass quantises the output gradient to e5m2 (more range, the
usual choice) or e4m3, and runs both gradient matmuls in fp8 as well. Scales are one per tensor
("tensorwise", the faster at small scale) or one per row of each operand ("rowwise", more
accurate with outliers). Master weights and optimizer state stay fp32; what is not converted
(embeddings, output head, norms, router, MoE experts) runs in bf16 autocast.

`_scaled_mm` wants both inner dimensions divisible by 16; layers that are not are left in bf16
and listed by `convert_to_float8`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
Scaling = Literal["tensorwise", "rowwise"]


def quantize(
    t: torch.Tensor, dtype: torch.dtype, rowwise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (2-D) in `dtype` scaled so its largest magnitude (per row when `rowwise`) lands on
    the format's largest value; returns the fp8 tensor and the inverse scale _scaled_mm takes."""
    amax = t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
    scale = torch.finfo(dtype).max / amax.float().clamp(min=1e-12)
    quantized = (t.float() * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    return quantized.to(dtype), scale.reciprocal()


def scaled_mm(
    aq: torch.Tensor,
    a_scale: torch.Tensor,
    bq: torch.Tensor,
    b_scale: torch.Tensor,
    fast_accum: bool = False,
) -> torch.Tensor:
    """aq @ bq.T of quantised operands (aq: (M, K), bq: (N, K)), unscaled, in bf16."""
    rowwise = a_scale.numel() > 1
    # _scaled_mm: the first operand row-major, the second column-major (a transposed row-major).
    return torch._scaled_mm(
        aq,
        bq.t(),
        scale_a=a_scale,
        scale_b=b_scale.t() if rowwise else b_scale,
        out_dtype=torch.bfloat16,
        use_fast_accum=fast_accum,
    )


def fp8_matmul(
    a: torch.Tensor, a_dtype: torch.dtype, b: torch.Tensor, b_dtype: torch.dtype, rowwise: bool
) -> torch.Tensor:
    """a @ b.T in fp8 (a: (M, K), b: (N, K)), bf16 result. Rowwise scales run along K for both
    operands, so each output element carries one scale of a's row and one of b's row."""
    return scaled_mm(*quantize(a, a_dtype, rowwise), *quantize(b, b_dtype, rowwise))


class _Float8Linear(torch.autograd.Function):
    """Forward: X W^T with fast (reduced-precision) accumulation, as torchao's recipes do for
    the output; the gradient matmuls accumulate exactly. Tensorwise scaling saves the fp8 copies
    of X and W for the backward (half the memory of bf16 X, and no second quantisation pass:
    one scale serves a matrix and its transpose); rowwise scales run along the other dimension
    in the backward, so it quantises X and W again there."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        rowwise: bool,
        grad_dtype: torch.dtype,
    ) -> torch.Tensor:
        ctx.rowwise, ctx.grad_dtype = rowwise, grad_dtype
        ctx.dtypes = (x.dtype, weight.dtype)
        xq, x_scale = quantize(x, E4M3, rowwise)
        wq, w_scale = quantize(weight, E4M3, rowwise)
        if rowwise:
            ctx.save_for_backward(x, weight)
        else:
            ctx.save_for_backward(xq, x_scale, wq, w_scale)
        return scaled_mm(xq, x_scale, wq, w_scale, fast_accum=not rowwise)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        rowwise, grad_dtype = ctx.rowwise, ctx.grad_dtype
        x_dtype, w_dtype = ctx.dtypes
        grad = grad.contiguous()
        if rowwise:
            x, weight = ctx.saved_tensors
            # dX = dY W: K-contiguous operands are dY (M, N) and W^T (K, N).
            grad_x = fp8_matmul(grad, grad_dtype, weight.t().contiguous(), E4M3, True)
            # dW = dY^T X: operands dY^T (N, M) and X^T (K, M).
            grad_w = fp8_matmul(grad.t().contiguous(), grad_dtype, x.t().contiguous(), E4M3, True)
            return grad_x.to(x_dtype), grad_w.to(w_dtype), None, None
        xq, x_scale, wq, w_scale = ctx.saved_tensors
        gq, g_scale = quantize(grad, grad_dtype, False)
        # The same products on the saved fp8 tensors, transposed by copies of one byte per value.
        grad_x = scaled_mm(gq, g_scale, wq.t().contiguous(), w_scale)
        grad_w = scaled_mm(gq.t().contiguous(), g_scale, xq.t().contiguous(), x_scale)
        return grad_x.to(x_dtype), grad_w.to(w_dtype), None, None


class Float8Linear(nn.Linear):
    """nn.Linear (no bias) whose matmuls run in fp8; same parameters, so checkpoints, export and
    the optimizer see an ordinary linear layer."""

    scaling: Scaling = "tensorwise"
    grad_dtype: torch.dtype = E5M2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not x.is_cuda:
            # Evaluation on CPU: the fp8 emulation there is slow and gains nothing.
            return F.linear(x, self.weight)
        flat = x.reshape(-1, x.shape[-1])
        out = _Float8Linear.apply(flat, self.weight, self.scaling == "rowwise", self.grad_dtype)
        return out.view(*x.shape[:-1], out.shape[-1])


# Layers that stay in bf16 whatever their shape: the token embedding, the output head (its
# logits feed a softmax over the whole vocabulary), and the MoE router (its choices flip on
# small errors).
KEEP_HIGH_PRECISION = ("embed_tokens", "lm_head", "router")


def convert_to_float8(
    model: nn.Module, scaling: Scaling = "tensorwise", backward: Literal["e5m2", "e4m3"] = "e5m2"
) -> list[str]:
    """Turn the model's eligible nn.Linear layers into Float8Linear in place; return the names
    of the linear layers left in bf16 (and why)."""
    kept = []
    grad_dtype = E5M2 if backward == "e5m2" else E4M3
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if name.split(".")[-1] in KEEP_HIGH_PRECISION:
            kept.append(f"{name} (kept in bf16 by design)")
        elif module.bias is not None:
            kept.append(f"{name} (has a bias)")
        elif module.in_features % 16 or module.out_features % 16:
            kept.append(f"{name} ({module.in_features}x{module.out_features}: not multiples of 16)")
        else:
            module.__class__ = Float8Linear
            module.scaling, module.grad_dtype = scaling, grad_dtype
    return kept
