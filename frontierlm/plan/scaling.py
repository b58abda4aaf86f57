"""Scaling laws: L(N, D) = E + A / N^alpha + B / D^beta, its compute-optimal N and D under
C = 6 N D, the published fits, a robust fit to one's own runs, and the batch-size / learning-rate
rule.

Published constants (N: parameters with embeddings, D: training tokens, L: nats per token):
  - Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (arXiv 2203.15556),
    approach 3, eq. (10): E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28.
    (The paper's TeX source holds the unrounded alpha = 0.3392, beta = 0.2849, E = 1.6934.)
  - Besiroglu, Erdil, Barnett, You 2024, "Chinchilla Scaling: A replication attempt" (Epoch AI,
    arXiv 2404.10102): refit of approach 3 to the data read off Hoffmann's figure 4:
    E = 1.8172, A = 482.01, B = 2085.43, alpha = 0.3478, beta = 0.3658.
Both come from MassiveText with the Chinchilla tokenizer; their E, A, B do not transfer to
another corpus or tokenizer, which is what `frontierlm sweep` is for.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

IDENTIFIED_MAX = 2.0  # the largest exponent in Hoffmann et al.'s grid of starting points


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = "fit"
    source: str = ""
    extra: dict = field(default_factory=dict, compare=False)  # fit diagnostics, sweep metadata

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N, D) minimising the loss at `compute` = 6 N D FLOPs (Hoffmann et al. eq. 4):
        N = G (C/6)^a, D = (C/6)^b / G, G = (alpha A / (beta B))^(1/(alpha+beta)),
        a = beta / (alpha + beta), b = alpha / (alpha + beta)."""
        if compute <= 0:
            raise ValueError(f"compute must be positive, got {compute}")
        if not self.has_optimum:
            raise ValueError(
                f"the law {self.name!r} has alpha={self.alpha:.3g}, beta={self.beta:.3g}: loss "
                "does not fall with both N and D, so no compute-optimal split exists (the runs "
                "do not constrain it; sweep a wider range of sizes and tokens)"
            )
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        n = g * (compute / 6.0) ** (self.beta / s)
        return n, compute / 6.0 / n

    @property
    def has_optimum(self) -> bool:
        return self.alpha > 0 and self.beta > 0 and self.A > 0 and self.B > 0

    @property
    def identified(self) -> bool:
        """Both exponents within Hoffmann et al.'s starting grid (0, 2]: past it a term runs off
        because the runs barely depend on N or D, and its optimum means nothing."""
        return 0 < self.alpha <= IDENTIFIED_MAX and 0 < self.beta <= IDENTIFIED_MAX

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, origin: str = "law") -> ScalingLaw:
        if "law" in data:  # a sweep's JSON holds the law under "law"
            data = data["law"]
        missing = [k for k in ("E", "A", "B", "alpha", "beta") if k not in data]
        if missing:
            raise ValueError(f"{origin}: no scaling law here, missing keys {missing}")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @classmethod
    def load(cls, path: str | Path) -> ScalingLaw:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"--law {path}: no such file (a sweep writes runs/<name>/sweep/sweep.json)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--law {path}: not JSON ({err})") from None
        return cls.from_json(data, str(path))


HOFFMANN = ScalingLaw(
    E=1.69,
    A=406.4,
    B=410.7,
    alpha=0.34,
    beta=0.28,
    name="Hoffmann et al. 2022 (approach 3)",
    source="arXiv 2203.15556, eq. 10",
)
EPOCH = ScalingLaw(
    E=1.8172,
    A=482.01,
    B=2085.43,
    alpha=0.3478,
    beta=0.3658,
    name="Besiroglu et al. 2024 (Epoch AI refit)",
    source="arXiv 2404.10102, table 1",
)
PUBLISHED = {"hoffmann": HOFFMANN, "epoch": EPOCH}

TOKENS_PER_PARAM = 20.0  # Chinchilla's rule of thumb: 70B parameters, 1.4T tokens


def tokens_per_param_optimum(
    compute: float, ratio: float = TOKENS_PER_PARAM
) -> tuple[float, float]:
    """(N, D) with D = ratio * N and 6 N D = compute."""
    n = math.sqrt(compute / (6.0 * ratio))
    return n, ratio * n


# ----------------------------------------------------------------------------- batch and lr


def deepseek_batch_lr(compute: float) -> tuple[float, float]:
    """(batch size in tokens, peak learning rate) from DeepSeek LLM's fit (DeepSeek-AI 2024,
    arXiv 2401.02954, eq. 1): B_opt = 0.2920 C^0.3271, eta_opt = 0.3118 C^-0.1250, fitted with
    AdamW on budgets of 1e17-2e19 FLOPs (C there counts non-embedding FLOPs per token times
    tokens); beyond that range it is an extrapolation."""
    return 0.2920 * compute**0.3271, 0.3118 * compute**-0.1250


def sqrt_lr_scaling(lr: float, batch: float, reference_batch: float) -> float:
    """Adam's square-root rule (Malladi et al. 2022, arXiv 2205.10287): the learning rate for
    `batch` given one tuned at `reference_batch`; what `pretrain.lr_batch_scaling = "sqrt"`
    applies."""
    return lr * math.sqrt(batch / reference_batch)


# ----------------------------------------------------------------------------- fitting


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative."""
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return loss, grad


def _objective(theta: np.ndarray, log_n, log_d, log_l, delta: float):
    """Hoffmann et al.'s objective: the sum of Huber(LSE(a - alpha log N, b - beta log D, e)
    - log L) over the runs, with A = exp(a), B = exp(b), E = exp(e). Summed, not averaged:
    Besiroglu et al. found the averaged version stops L-BFGS before convergence."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    lse = top + np.log(total)
    loss, dloss = _huber(lse - log_l, delta)
    w = weights / total * dloss  # d loss / d term, per run
    grad = np.array(
        [w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * log_n).sum(), -(w[1] * log_d).sum()]
    )
    return loss.sum(), grad


def _grid_objective(thetas: np.ndarray, log_n, log_d, log_l, delta: float) -> np.ndarray:
    """`_objective`'s value at many parameter vectors (rows of `thetas`) at once."""
    a, b, e, alpha, beta = (thetas[:, i : i + 1] for i in range(5))
    lse = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    return _huber(lse - log_l, delta)[0].sum(axis=1)


# Hoffmann et al.'s grid of initialisations (appendix D.2): alpha, beta in {0, 0.5, ..., 2},
# e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}.
HOFFMANN_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}


def _one_blas_thread():
    """scipy's L-BFGS-B calls BLAS on 5-element vectors; a multi-threaded BLAS on a busy
    machine made each call 20x slower (measured here), so the fit runs single-threaded."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it the fit is slower on a loaded machine, not different
        return contextlib.nullcontext()
    return threadpool_limits(1)


def fit_law(
    n: np.ndarray,
    d: np.ndarray,
    loss: np.ndarray,
    delta: float = 1e-3,
    grid: dict[str, np.ndarray] | None = None,
    starts: int = 16,
) -> ScalingLaw:
    """Fit L = E + A/N^alpha + B/D^beta to runs (N, D, final loss) as Hoffmann et al. did: a
    Huber loss (delta 1e-3) on log-space residuals, minimised by L-BFGS from a grid of
    initialisations. The whole grid (4,500 points) is scored at once and L-BFGS runs from the
    `starts` best of them (all of them: starts=0); the lowest optimum wins."""
    from scipy.optimize import minimize

    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    if not (n.shape == d.shape == loss.shape) or n.ndim != 1:
        raise ValueError("n, d and loss must be 1-D arrays of one length")
    if len(n) < 5:
        raise ValueError(f"fitting 5 parameters needs at least 5 runs, got {len(n)}")
    if (n <= 0).any() or (d <= 0).any() or (loss <= 0).any():
        raise ValueError("parameters, tokens and losses must all be positive")
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    grid = grid or HOFFMANN_GRID
    inits = np.array(
        list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"]))
    )
    if starts and starts < len(inits):
        scores = _grid_objective(inits, log_n, log_d, log_l, delta)
        inits = inits[np.argsort(scores, kind="stable")[:starts]]
    best = None
    with _one_blas_thread():
        for theta in inits:
            result = minimize(
                _objective,
                theta,
                args=(log_n, log_d, log_l, delta),
                jac=True,
                method="L-BFGS-B",
                # The objective is ~1e-5 near the optimum: scipy's default ftol (relative to
                # max(|f|, 1)) would stop far from it, the trap Besiroglu et al. found.
                options={"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-9},
                # When the loss hardly depends on N (or D) the exponent runs off and log A with
                # it; capping log A and log B keeps exp() finite so the runaway is reported.
                bounds=[(None, 700.0), (None, 700.0), (None, None), (None, None), (None, None)],
            )
            if best is None or result.fun < best.fun:
                best = result
    a, b, e, alpha, beta = best.x
    law = ScalingLaw(
        E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta)
    )
    predicted = law.loss(n, d)
    residuals = np.log(predicted) - log_l
    # R^2 of the losses themselves: the share of the runs' spread in loss the law explains.
    spread = float(((loss - loss.mean()) ** 2).sum())
    r2 = 1.0 - float(((loss - predicted) ** 2).sum()) / spread if spread > 0 else float("nan")
    return ScalingLaw(
        **{k: getattr(law, k) for k in ("E", "A", "B", "alpha", "beta")},
        name="fit",
        source=f"Huber (delta {delta}) fit of {len(n)} runs, L-BFGS from {len(inits)} starts",
        extra={
            "objective": float(best.fun),
            "rms_log_residual": float(np.sqrt(np.mean(residuals**2))),
            "max_abs_residual": float(np.abs(loss - predicted).max()),  # nats
            "r2": r2,
            "runs": len(n),
        },
    )
