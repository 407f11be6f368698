"""``flaxlm report`` on a run dir in a bucket (an S3 server and a GCS emulator on 127.0.0.1):
metrics.jsonl is read from its segments as one file, the plots are drawn on this host and
copied into ``RUN_DIR/report`` beside the run."""

from __future__ import annotations

import object_stores

from flaxlm import storage
from flaxlm.cli import main
from flaxlm.train.metrics_log import MetricsLog

# the servers' fixtures (tests/object_stores.py)
bucket, s3_server, gcs_server = (
    object_stores.bucket,
    object_stores.s3_server,
    object_stores.gcs_server,
)


def test_report_of_a_run_in_a_bucket(bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLAXLM_CACHE", str(tmp_path / "cache"))
    run = f"{bucket}/runs/r"
    log = MetricsLog(run)
    for step in range(1, 31):
        log.write({"step": step, "loss": 5.0 - step / 10, "lr": 1e-3})
    log.write({"step": 30, "val_loss": 2.5})
    log.close()
    assert storage.children(f"{run}/metrics") == ["000000000.jsonl"]
    report = '{"step": 30, "val_loss": 2.5, "perplexity": 12.18, "accuracy": 0.3, "tokens": 4096}'
    storage.write_text(f"{run}/evals/step_30.val.json", report)
    assert main(["report", run]) == 0
    md = storage.read_text(f"{run}/report/report.md")
    assert md.startswith(f"# Run report: `{run}`") and "step_30.val.json" in md
    assert {"loss.png", "report.md"} <= set(storage.children(f"{run}/report"))


def test_report_of_an_empty_bucket_folder_is_one_line(bucket, capsys):
    assert main(["report", f"{bucket}/nothing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bucket}/nothing/metrics.jsonl does not exist" in err


def test_the_goodput_ledger_of_a_run_in_a_bucket_survives_a_restart(bucket, tmp_path, monkeypatch):
    from flaxlm.train import goodput
    from flaxlm.train.goodput import GoodputClock, read_goodput

    class Clock:  # time.time() for the ledger, advanced by hand
        now = 1000.0

        def time(self) -> float:
            return self.now

    def attempt(run_dir, clock: Clock, killed: bool) -> None:
        ledger = GoodputClock.open(run_dir)
        ledger.resumed(0 if not read_goodput(run_dir) else 2)
        for step in (1, 2, 3):
            ledger.enter("step", step)
            clock.now += 2.0
            if step == 2:
                ledger.enter("checkpoint", 2)
                clock.now += 1.0
                ledger.saved(2)  # written through at once: a restart reads this line
                if killed:
                    clock.now += 5.0  # the kill, the scheduler
                    return
        ledger.close()

    runs = {}
    for name, run_dir in (("here", str(tmp_path / "run")), ("there", f"{bucket}/runs/r")):
        clock = Clock()
        monkeypatch.setattr(goodput, "time", clock)
        storage.make_dirs(run_dir)
        attempt(run_dir, clock, killed=True)
        attempt(run_dir, clock, killed=False)
        runs[name] = read_goodput(run_dir)
    assert runs["there"] == runs["here"]  # the bucket's ledger is the folder's, line for line
    assert runs["there"][-1]["parts"]["lost"] == 5.0
