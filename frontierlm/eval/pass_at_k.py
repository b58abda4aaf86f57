"""pass@k over n sampled answers per problem.

The unbiased estimator of Chen et al. 2021 (HumanEval): with n samples of which c are correct,
pass@k = 1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement from the n
include a correct one; computed as a running product so large n does not overflow. Averaged over
problems. Answers are checked by the GSM8K verifier or, for HumanEval-style items, by running the
program with its unit tests in a separate Python process with a time and memory limit (a guard
against runaway code, not a security sandbox: evaluate untrusted models in a container).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

from frontierlm.eval.exact_match import prompt_ids, reference_answer, stop_ids
from frontierlm.eval.tasks import TaskSpec
from frontierlm.inference.engine import generate
from frontierlm.inference.sampling import SamplingParams
from frontierlm.posttrain.rewards import exact_match


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) for one problem with c correct of n samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _limit_memory() -> None:  # in the child, before exec: 1 GiB of address space
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def run_python_tests(program: str, timeout_s: float) -> bool:
    """True when `program` exits 0 within `timeout_s` in a fresh, isolated interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", program],
                cwd=tmp,
                capture_output=True,
                timeout=timeout_s,
                preexec_fn=_limit_memory if os.name == "posix" else None,
                env={"PATH": os.environ.get("PATH", "")},
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def check_sample(spec: TaskSpec, item: dict[str, Any], text: str) -> bool:
    if spec.verifier == "gsm8k":
        return exact_match(text, reference_answer(spec, item), fallback="last_number")
    for field in ("prompt", "test", "entry_point"):
        if field not in item:
            raise ValueError(f"task {spec.name}: python_tests items need {field!r}")
    program = f"{item['prompt']}{text}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"
    return run_python_tests(program, spec.timeout_s)


def evaluate_pass_at_k(
    model, tok, spec: TaskSpec, items: list[dict[str, Any]], seed: int = 0
) -> dict[str, Any]:
    params = SamplingParams(
        max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        stop_ids=stop_ids(tok),
        stop_strings=tuple(spec.until),
        seed=seed,
    )
    prompts = prompt_ids(spec, items, tok)
    repeated = [p for p in prompts for _ in range(spec.samples)]
    completions = generate(model, repeated, params, tokenizer=tok)
    records = []
    for i, item in enumerate(items):
        texts = [tok.decode(c.ids) for c in completions[i * spec.samples : (i + 1) * spec.samples]]
        correct = sum(check_sample(spec, item, t) for t in texts)
        records.append({"n": spec.samples, "correct": correct, "first_sample": texts[0]})
    metrics = {
        f"pass@{k}": float(np.mean([pass_at_k(r["n"], r["correct"], k) for r in records]))
        for k in spec.k
    }
    return {"metrics": metrics, "items": records}
