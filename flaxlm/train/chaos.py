"""The chaos harness: the training loop with scheduled faults, for tests and benchmarks only.

    python -m flaxlm.train.chaos configs/gpt_tiny.yaml chaos.nan_at_steps=[7] ...
    from flaxlm.train.chaos import train_with_chaos; train_with_chaos(cfg)

``flaxlm train`` runs the same loop with the production :class:`StepControls`, which refuses a
config with ``chaos.*`` faults; here :class:`ChaosControls` wraps the dispatch of each step:

- ``chaos.spike_at_steps``: the step's LR factor times ``chaos.spike_lr_scale``;
- ``chaos.nan_at_steps``: the parameters the step starts from become NaN, so its loss and
  gradients do, and the guard sees a numerically broken step;
- ``chaos.hang_at_steps``: the host stalls before dispatching, for the watchdog to catch.

A fault is attached to the batch that step s trains on in an undisturbed run (data position
s - 1), so after a rollback it is skipped with its batch, as a real bad batch would be; a hang
fires only while no data has been skipped. The jitted production step is not touched: the NaN
comes from a separate small jitted function, run only at a NaN step.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax.training.train_state import TrainState

from flaxlm.config import Config
from flaxlm.train.controls import StepControls
from flaxlm.train.guard_rules import TrainingDiverged
from flaxlm.train.guard_state import GuardState
from flaxlm.train.loop import TrainResult, train
from flaxlm.train.program import TrainProgram


class ChaosControls(StepControls):
    injects_faults = True

    def __init__(self, cfg: Config, program: TrainProgram, healing: GuardState):
        super().__init__(cfg, program, healing)
        self.chaos = cfg.chaos
        self.spikes, self.nans = set(cfg.chaos.spike_at_steps), set(cfg.chaos.nan_at_steps)
        self.hangs = set(cfg.chaos.hang_at_steps)
        self._poison = jax.jit(
            lambda params: jax.tree.map(lambda p: p + jnp.asarray(jnp.nan, p.dtype), params),
            out_shardings=program.shardings.params,
        )

    def lr_factor(self, step: int, data_index: int) -> float:
        """The guard's cool-down, times ``chaos.spike_lr_scale`` on a spike's batch."""
        factor = super().lr_factor(step, data_index)
        if data_index + 1 in self.spikes:
            factor *= self.chaos.spike_lr_scale
        return factor

    def dispatch(
        self, state: TrainState, batch: dict[str, Any], step: int, data_index: int
    ) -> tuple[TrainState, dict[str, Any]]:
        if step + 1 in self.hangs and data_index == step:
            time.sleep(1e6)  # a stalled host, for the watchdog to catch
        if data_index + 1 in self.nans:
            state = state.replace(params=self._poison(state.params))
        return super().dispatch(state, batch, step, data_index)


def train_with_chaos(cfg: Config, stop_at_step: int | None = None) -> TrainResult:
    """:func:`flaxlm.train.train` with ``cfg.chaos``'s faults injected."""
    return train(cfg, stop_at_step, controls=ChaosControls)


def main(argv: list[str] | None = None) -> int:
    """``flaxlm train`` under the chaos harness: the same output and exit codes (0 done, 75
    preempted before the last step, 3 diverged, 2 a bad config)."""
    from flaxlm.config import ConfigError, load_config
    from flaxlm.runtime.distributed import initialize
    from flaxlm.train.watchdog import EXIT_CODE

    parser = argparse.ArgumentParser(prog="python -m flaxlm.train.chaos", description=__doc__)
    parser.add_argument("config", help="YAML config, e.g. configs/gpt_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        initialize(cfg.train.distributed)
        result = train_with_chaos(cfg)
    except TrainingDiverged as exc:
        print(f"chaos: training diverged: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        return 2
    if result.preempted and result.step < cfg.train.steps:
        return EXIT_CODE
    if result.process_index == 0:
        _print_outcome(result, cfg)
    return 0


def _print_outcome(result: TrainResult, cfg: Config) -> None:
    """The lines ``flaxlm train`` prints at the end: rollbacks, then the last evaluation."""
    from flaxlm.families import family_of, summary_line

    if result.rollbacks:
        ledger = result.run_dir / "skip_ledger.json"
        print(f"{len(result.rollbacks)} rollback(s); skipped data windows in {ledger}")
    outcome = f"step {result.step}"
    if result.evals:
        outcome += f", {summary_line(result.evals[-1], family_of(cfg))}"
    print(f"done: {outcome}; run dir {result.run_dir}")


if __name__ == "__main__":
    raise SystemExit(main())
