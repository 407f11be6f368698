"""Does a host's memory and start-up stay flat as a prepared corpus grows? (issue: data at
pod scale). Builds a 1x corpus (the demo text) and two 10x ones (10x the files; the same
files, 10x longer), prepares them, then for each:

- start-up: the seconds to open the data a run trains on (``prepare_data``) in a fresh
  process, for the prepared corpus and for the raw sources with a warm tokenize-once cache
  (which re-hashes every source file: that grows with the corpus);
- host RSS: the peak resident memory of a fresh ``flaxlm train`` process on the prepared
  corpus (gpt_tiny, the same steps on both), and its ratio to the 1x run.

    python benchmarks/data_scale.py --corpus data/shakespeare [--scale 10] [--steps 200]

Prints a Markdown table (copied into benchmarks/RESULTS.md) and the JSON rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "gpt_tiny.yaml"

# Runs in a fresh process: the seconds prepare_data takes, and the process's peak RSS.
OPEN_DATA = """
import json, resource, sys, time
from flaxlm.config import load_config
from flaxlm.data import prepare_data
cfg = load_config(sys.argv[1], sys.argv[2:])
t0 = time.perf_counter()
data = prepare_data(cfg.data, cfg.model.vocab_size, progress=False)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "train_tokens": data.train.n_tokens,
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
TRAIN = """
import json, resource, sys
from flaxlm.config import load_config
from flaxlm.train import train
train(load_config(sys.argv[1], sys.argv[2:]))
print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(script: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", script, str(CONFIG), *args], capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_corpus(src: Path, out: Path, copies: int, grow: str) -> Path:
    """``src`` grown ``copies`` times: more files (``files``: copies under other names, so
    other doc ids) or longer ones (``content``: each file's text repeated, same files)."""
    out.mkdir(parents=True)
    for path in sorted(src.rglob("*.txt")):
        if grow == "files":
            for c in range(copies):
                shutil.copy(path, out / f"{c:03d}-{path.name}")
        else:
            (out / path.name).write_text("\n\n".join([path.read_text()] * copies))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="a folder of .txt files (the 1x corpus)")
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="flaxlm-data-scale-") as tmp:
        tmp = Path(tmp)
        for copies, grow in ((1, "files"), (args.scale, "content"), (args.scale, "files")):
            name = f"{copies}x" + (f" ({grow})" if copies > 1 else "")
            raw = make_corpus(Path(args.corpus), tmp / f"raw{copies}{grow}", copies, grow)
            data = [f"data.paths=[{raw}]", f"data.cache_dir={tmp / 'cache'}"]
            prepared = tmp / f"prepared{copies}{grow}"
            subprocess.run(
                [sys.executable, "-m", "flaxlm.cli", "data", "prepare", str(CONFIG), *data,
                 "--out", str(prepared), "--workers", str(args.workers), "--json"],
                check=True,
            )  # fmt: skip
            child(OPEN_DATA, *data)  # builds the cache; the next open is a warm start
            cached = child(OPEN_DATA, *data)
            opened = child(OPEN_DATA, f"data.prepared={prepared}")
            run = child(
                TRAIN, f"data.prepared={prepared}", f"train.run_dir={tmp / f'run{copies}{grow}'}",
                f"train.steps={args.steps}", f"train.eval_every={args.steps}",
                f"checkpoint.every={args.steps}", "train.progress=false",
            )  # fmt: skip
            rows.append({
                "corpus": name, "files": len(list(raw.iterdir())),
                "train_tokens": opened["train_tokens"],
                "open_prepared_s": round(opened["seconds"], 3),
                "open_cache_s": round(cached["seconds"], 3),
                "train_peak_rss_mib": round(run["maxrss_mib"], 1),
            })  # fmt: skip
    base = rows[0]["train_peak_rss_mib"]
    print("| corpus | files | train tokens | open prepared (s) | open raw, warm cache (s) | "
          "train peak RSS (MiB) | RSS vs 1x |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['corpus']} | {r['files']} | {r['train_tokens']:,} | "
            f"{r['open_prepared_s']:.3f} | {r['open_cache_s']:.3f} | "
            f"{r['train_peak_rss_mib']:.0f} | {r['train_peak_rss_mib'] / base:.3f} |"
        )
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
