"""The spike guard's two error rates, measured: false alarms on healthy runs and detection of
injected faults, on every shipped tiny config over several seeds.

    python benchmarks/guard_alarms.py --corpus data/shakespeare [--seeds 5] [--steps 150]
    python benchmarks/guard_alarms.py --corpus data/shakespeare --healthy-only --steps 0 \
        --configs gpt_demo bert_demo unified_demo      # the demo configs, their full length

For each config and seed:
- a healthy run (no faults): every rollback is a false alarm. Its loss trace is also replayed
  through the detector flaxlm used before (mean + 6 std of the window, no floor), straight and
  with its window emptied every 40 steps as a restart used to do, to show why it was replaced;
- faulty runs with an LR spike (x1000 and a milder x30) at step 60, a NaN at 100 and another
  spike at 140. Faults are attached to data positions (``chaos.*``: step s of an undisturbed
  run trains on position s - 1), so after a rollback they come at other step numbers; a fault
  counts as detected when a rollback's bad step trained on its position or one of the next
  two (the rollback's ``skipped`` window ends there). Any other rollback is a false alarm.
Prints a Markdown table (copied into benchmarks/RESULTS.md) and writes JSON lines to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import deque
from pathlib import Path

import numpy as np

from flaxlm.config import load_config
from flaxlm.train.chaos import train_with_chaos as train  # injects the chaos.* faults

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("gpt_tiny", "bert_tiny", "unified_tiny")
SPIKES, NAN = (60, 140), 100


def old_detector_alarms(losses: list[float], restart_every: int = 0) -> int:
    """Alarms of the previous rule: loss > mean + 6 std of the last 128 healthy losses, after
    20 of them; ``restart_every`` empties the window as each restart did."""
    window: deque[float] = deque(maxlen=128)
    alarms = 0
    for i, loss in enumerate(losses):
        if restart_every and i % restart_every == 0:
            window.clear()
        if len(window) >= 20:
            mean, std = float(np.mean(window)), float(np.std(window))
            if loss > mean + 6 * std and loss > mean * 1.001:
                alarms += 1
                continue
        window.append(loss)
    return alarms


def run(name: str, corpus: str, seed: int, steps: int, faults: list[str], tmp: Path) -> dict:
    cfg = load_config(
        REPO / "configs" / f"{name}.yaml",
        [
            f"data.paths=[{corpus}]",
            f"data.cache_dir={tmp / 'cache'}",
            f"train.run_dir={tmp / f'{name}-{seed}-{abs(hash(tuple(faults)))}'}",
            f"train.seed={seed}",
            *([f"train.steps={steps}"] if steps else []),
            "train.eval_every=0",
            "train.log_every=1",
            "checkpoint.every=10",
            "guard.max_rollbacks=10",
            *faults,
        ],
    )
    result = train(cfg)
    losses = [r["loss"] for r in result.history if "loss" in r]
    # The data position the bad step trained on ends each skipped window (guard.margin=0).
    return {"rollbacks": [r["skipped"][1] for r in result.rollbacks], "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", required=True, help="a text folder, e.g. data/shakespeare")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150, help="0: the config's own")
    parser.add_argument("--healthy-only", action="store_true", help="no fault-injected runs")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--scales", nargs="+", type=float, default=[1000.0, 30.0])
    parser.add_argument("--out", default=str(REPO / "benchmarks/guard_alarms.jsonl"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, open(args.out, "a") as out:
        for name in args.configs:
            row = {"config": name, "runs": 0, "false_alarms": 0, "old_alarms": 0,
                   "old_alarms_restarts": 0, "faults": 0, "detected": {}}  # fmt: skip
            for seed in range(args.seeds):
                healthy = run(name, args.corpus, seed, args.steps, [], Path(tmp))
                row["runs"] += 1
                row["false_alarms"] += len(healthy["rollbacks"])
                row.setdefault("healthy_false_alarms", 0)
                row["healthy_false_alarms"] += len(healthy["rollbacks"])
                row["old_alarms"] += old_detector_alarms(healthy["losses"])
                row["old_alarms_restarts"] += old_detector_alarms(healthy["losses"], 40)
                for scale in [] if args.healthy_only else args.scales:
                    faults = [
                        f"chaos.spike_at_steps=[{SPIKES[0]},{SPIKES[1]}]",
                        f"chaos.spike_lr_scale={scale}",
                        f"chaos.nan_at_steps=[{NAN}]",
                    ]
                    faulty = run(name, args.corpus, seed, 170, faults, Path(tmp))
                    hits = row["detected"].setdefault(f"spike x{scale}", [0, 0])
                    nan_hits = row["detected"].setdefault("NaN", [0, 0])
                    near = faulty["rollbacks"]
                    faults_at = (*SPIKES, NAN)
                    for at in SPIKES:
                        hits[0] += any(at - 1 <= d <= at + 1 for d in near)
                        hits[1] += 1
                    nan_hits[0] += any(NAN - 1 <= d <= NAN + 1 for d in near)
                    nan_hits[1] += 1
                    caused = [d for d in near if not any(a - 1 <= d <= a + 1 for a in faults_at)]
                    row["false_alarms"] += len(caused)
                    row["runs"] += 1
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
    print(
        "| config | runs | false alarms (now) | old rule, healthy | old rule, restart every 40 "
        + "".join(f"| {k} " for k in rows[0]["detected"])
        + "|"
    )
    print("|---" * (5 + len(rows[0]["detected"])) + "|")
    for r in rows:
        detected = "".join(f" {a}/{b} |" for a, b in r["detected"].values())
        print(f"| {r['config']} | {r['runs']} | {r['false_alarms']} | {r['old_alarms']} | "
              f"{r['old_alarms_restarts']} |{detected}")  # fmt: skip
    return 0 if all(math.isfinite(r["false_alarms"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
