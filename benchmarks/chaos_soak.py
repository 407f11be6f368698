"""A soak test of flaxlm's self-healing: a run with scheduled faults, restarted after each one
until it finishes, compared with the same run left alone.

    python benchmarks/chaos_soak.py --corpus data/shakespeare [--kills 6] [--steps 60] [--seed 0]

Faults: ``kill -9`` at random steps (checkpoints every 2 steps, saved synchronously, so many
land in the middle of a save), one SIGTERM (a graceful preemption), the newest checkpoint
corrupted (bytes flipped in a file) after one kill, and in the run's config an LR spike and a
NaN (``chaos.*``), so rollbacks happen and kills land around them. Both runs go through the
chaos harness (``python -m flaxlm.train.chaos``, flaxlm/train/chaos.py), which injects those
faults; ``flaxlm train`` refuses them. The report: faults injected and survived, steps lost to
kills (trained again after a restart), and whether the final parameters and metrics.jsonl
(timing fields aside) match the undisturbed run bit for bit. ``tests/test_chaos_soak.py`` runs
a short version in ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMING = ("tokens_per_s", "mfu", "goodput")


def overrides(corpus: str, cache: Path, run_dir: Path, steps: int, seed: int) -> list[str]:
    return [
        str(REPO / "configs" / "gpt_tiny.yaml"),
        f"data.paths=[{corpus}]",
        f"data.cache_dir={cache}",
        f"train.run_dir={run_dir}",
        f"train.steps={steps}",
        f"train.seed={seed}",
        "train.eval_every=10",
        "train.progress=false",
        "checkpoint.every=2",
        "checkpoint.asynchronous=false",
        "guard.warmup=5",
        "guard.known_good_after=4",
        "chaos.spike_at_steps=[23]",
        "chaos.nan_at_steps=[41]",
    ]


def start(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "flaxlm.train.chaos", *argv],  # flaxlm train + chaos.* faults
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def logged_step(run_dir: Path) -> int:
    """The newest step with a line in metrics.jsonl (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line).get("step", 0)))
        except (json.JSONDecodeError, ValueError):
            continue
    return max(steps)


def corrupt_newest_checkpoint(run_dir: Path, rng: random.Random) -> str | None:
    folders = sorted(
        (p for p in (run_dir / "checkpoints").glob("[0-9]*") if p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    if not folders:
        return None
    files = [p for p in folders[-1].rglob("*") if p.is_file() and p.stat().st_size > 16]
    target = rng.choice(files)
    data = bytearray(target.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 0xFF
    target.write_bytes(bytes(data))
    return f"{target.relative_to(run_dir)} byte {at}"


def metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in lines]


def same_params(a: Path, b: Path) -> bool:
    import jax
    import numpy as np

    from flaxlm.tools.load import load_checkpoint

    x, y = load_checkpoint(a), load_checkpoint(b)
    return x.step == y.step and all(
        np.array_equal(p, q)
        for p, q in zip(jax.tree.leaves(x.params), jax.tree.leaves(y.params), strict=True)
    )


def soak(corpus: str, workdir: Path, kills: int, steps: int, seed: int, timeout: float = 600):
    """Runs the undisturbed and the faulted run; returns the report dict."""
    rng = random.Random(seed)
    cache = workdir / "cache"
    straight, chaotic = workdir / "straight", workdir / "chaotic"
    proc = start(overrides(corpus, cache, straight, steps, seed))
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the undisturbed run failed:\n{out}")

    # Kill at random steps spread over the run; one of them is a SIGTERM instead.
    targets = sorted(rng.sample(range(3, steps - 2), kills))
    term_at = rng.randrange(kills)
    corrupt_after = rng.randrange(kills)
    report = {"faults_injected": 0, "faults_survived": 0, "steps_lost": 0, "restarts": 0}
    report["events"] = []
    argv = overrides(corpus, cache, chaotic, steps, seed)
    outputs: list[str] = []
    deadline = time.monotonic() + timeout
    for i, target in enumerate(targets):
        proc = start(argv)
        while proc.poll() is None and logged_step(chaotic) < target:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("soak timed out")
            time.sleep(0.005)
        if proc.poll() is not None:  # finished before the target: nothing to inject
            break
        sig = signal.SIGTERM if i == term_at else signal.SIGKILL
        reached = logged_step(chaotic)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=timeout)
        report["faults_injected"] += 1
        event = {"signal": sig.name, "at_step": reached, "exit": proc.returncode}
        if i == corrupt_after:
            damaged = corrupt_newest_checkpoint(chaotic, rng)
            if damaged:
                report["faults_injected"] += 1
                event["corrupted"] = damaged
        report["events"].append(event)
        report["restarts"] += 1
        outputs.append(out)
    proc = start(argv)
    out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    if proc.returncode != 0:
        raise RuntimeError(f"the faulted run did not finish (exit {proc.returncode}):\n{out}")
    outputs.append(out)
    # Each restart resumes from its newest intact checkpoint: the steps between that and the
    # step the killed attempt had reached are trained again (lost time, not lost data).
    resumed = [_resumed_from(o) for o in outputs[1:]]
    for event, back_to in zip(report["events"], resumed, strict=True):
        event["resumed_from"] = back_to
        report["steps_lost"] += max(0, event["at_step"] - (back_to or 0))
    report["faults_survived"] = report["faults_injected"]
    report["metrics_match"] = metrics(chaotic) == metrics(straight)
    report["params_match"] = same_params(chaotic, straight)
    report["rollbacks"] = [e for e in metrics(chaotic) if e.get("event") == "rollback"]
    return report


def _resumed_from(output: str) -> int | None:
    """The step in the ``resuming RUN_DIR from step N`` line of a training's output."""
    for line in output.splitlines():
        if line.startswith("resuming ") and " from step " in line:
            return int(line.split(" from step ")[1].split(",")[0].split()[0])
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = soak(args.corpus, Path(args.workdir or tmp), args.kills, args.steps, args.seed)
    print(json.dumps(report, indent=1))
    ok = report["metrics_match"] and report["params_match"]
    print(
        f"faults injected {report['faults_injected']}, survived {report['faults_survived']}, "
        f"restarts {report['restarts']}; final parameters and metrics.jsonl "
        f"{'match' if ok else 'DIFFER from'} the undisturbed run"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
