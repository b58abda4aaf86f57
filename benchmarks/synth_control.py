"""Is the synth loop's gain more than further SFT would give? The control for
recipes/synth-arithmetic.toml: the same SFT model trained the synth_sft stage's way (steps, lr,
batch) on the original SFT chats instead of the verified synthetic replies, scored on the same
held-out task, next to the stage's own before/after (from `synth_sft/heldout.json`).

Run after `frontierlm run recipes/synth-arithmetic.toml` (about 2 minutes on one CPU thread):
  OMP_NUM_THREADS=1 python benchmarks/synth_control.py [--run-dir runs/synth-arithmetic]
Prints a table; writes synth_control.json to $OUT when set, else benchmarks/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from frontierlm.config import load_config
from frontierlm.eval.exact_match import paired_comparison
from frontierlm.eval.harness import run_task
from frontierlm.eval.tasks import load_spec
from frontierlm.posttrain.sft import fine_tune
from frontierlm.stages import STAGES, StageContext
from frontierlm.tokenizer.train import load_tokenizer
from frontierlm.train.checkpoint import load_model_dir
from frontierlm.train.parallel import autocast

RECIPE = "recipes/synth-arithmetic.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=RECIPE)
    args = parser.parse_args()
    cfg = load_config(args.recipe)
    run_dir = cfg.run.run_dir
    stage = json.loads((run_dir / "synth_sft" / "heldout.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="synth-control-"))
    ctx = StageContext(cfg, STAGES["synth_sft"], work)
    control_cfg = cfg.synth_sft.model_copy(update={"sources": cfg.sft.sources})
    fine_tune(ctx, control_cfg, run_dir / "sft" / "model", "control")
    tok = load_tokenizer(run_dir / "tokenizer")
    spec = load_spec(cfg.synth_sft.heldout_task)

    def right(model_dir: Path) -> list[bool]:
        model = load_model_dir(model_dir, ctx.device).eval()
        with torch.no_grad(), autocast(ctx.device, cfg.synth_sft.precision):
            result = run_task(spec, model, tok, cfg.synth_sft.heldout_limit)
        return [r["strict"] for r in result["items"]]

    control = paired_comparison(right(run_dir / "sft" / "model"), right(work / "model"))
    shutil.rmtree(work)
    rows = {
        f"synth_sft on {stage['synth_chats']:,} verified synthetic chats": stage,
        f"control: the {cfg.synth_sft.steps} steps on the SFT chats": control,
    }
    print(f"| training data | before -> after ({spec.name}, n={stage['n']}) | only after / only "
          "before | McNemar p |\n| --- | --- | ---: | ---: |")  # fmt: skip
    for name, r in rows.items():
        print(
            f"| {name} | {r['before']:.3f} -> {r['after']:.3f} | {r['only_after']} / "
            f"{r['only_before']} | {r['mcnemar_p']:.2g} |"
        )
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "synth_control.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
