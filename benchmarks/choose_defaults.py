"""Measure the open choices of HRP (spec section 2) and pick the callback's defaults.

Run: python benchmarks/choose_defaults.py [--seeds 5]

Everything goes through the real callback and a real Trainer on the spec's section 3 toy
(`lightning_hrp.demos.FactorisationToy`, M 64x64 with singular values 1/i, LoRA rank 4):

1. mode x preheat learning rate: the loss that asymmetric main training converges to from the
   HRP direction (closed form, ||M||^2 - ||M P_A||^2), so only the direction counts.
2. direction_scale: classic LoRA (A and B trained) for a short budget of main steps, with the
   main learning rate tuned per scale on a grid, so neither scale wins by its learning rate alone.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings

import lightning.pytorch as pl

from lightning_hrp import HRPPreheatCallback
from lightning_hrp.demos import FactorisationToy

N, RANK, MAIN_LR = 64, 4, 1e-2


def _fit(toy: FactorisationToy, callbacks: list, max_steps: int) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(toy)


def direction_quality(seeds: int) -> None:
    print("## 1. Converged asymmetric loss from the HRP direction (lower is better)\n")
    print(f"Random A: theory {(1 - RANK / N) * sum(1 / i**2 for i in range(1, N + 1)):.3f}; "
          f"optimum {sum(1 / i**2 for i in range(RANK + 1, N + 1)):.3f}. Mean +- sd over {seeds} seeds, 20 preheat steps.\n")
    print("| preheat_rank | mode | preheat_lr = 1x main | 3x | 10x |")
    print("|---|---|---|---|---|")
    for preheat_rank in (16, 64):
        for mode in ("classic", "asymmetric"):
            cells = []
            for multiplier in (1, 3, 10):
                losses = []
                for seed in range(seeds):
                    pl.seed_everything(seed, verbose=False)
                    toy = FactorisationToy(n=N, rank=RANK, lr=MAIN_LR)
                    hrp = HRPPreheatCallback(preheat_rank, 20, mode=mode, preheat_lr=MAIN_LR * multiplier)
                    _fit(toy, [hrp], max_steps=1)
                    losses.append(toy.converged_asymmetric_loss())
                cells.append(f"{statistics.mean(losses):.3f} +- {statistics.stdev(losses):.3f}")
            print(f"| {preheat_rank} | {mode} | " + " | ".join(cells) + " |")
    print()


def _classic_final_loss(seed: int, lr: float, scale: str | None, main_steps: int) -> float:
    pl.seed_everything(seed, verbose=False)
    toy = FactorisationToy(n=N, rank=RANK, lr=lr, train_A=True)
    callbacks = [HRPPreheatCallback(64, 20, direction_scale=scale, preheat_lr=MAIN_LR)] if scale else []
    _fit(toy, callbacks, max_steps=main_steps)
    return toy.current_loss()


def direction_scale(seeds: int, main_steps: int = 30) -> None:
    print(f"## 2. Classic LoRA after {main_steps} main steps, main lr tuned per method (lower is better)\n")
    grid = (3e-3, 1e-2, 3e-2, 1e-1)
    print("| init | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | best |")
    print("|---|" + "---|" * (len(grid) + 1))
    for scale in (None, "unit", "match_init_norm"):
        means = [statistics.mean(_classic_final_loss(s, lr, scale, main_steps) for s in range(seeds)) for lr in grid]
        name = "random (peft default)" if scale is None else f"HRP, direction_scale={scale}"
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {min(means):.3f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--part", choices=["all", "direction", "scale"], default="all")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.part in ("all", "direction"):
        direction_quality(args.seeds)
    if args.part in ("all", "scale"):
        direction_scale(args.seeds)


if __name__ == "__main__":
    main()
