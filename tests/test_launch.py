"""The cluster launchers in launch/: syntax, dry-runs, and runs against fake srun / gcloud /
kubectl, so SLURM, TPU pods and Kubernetes are checked here without any of them.

Each fake is a tiny script first on PATH. The fakes of srun and gcloud do what the real ones
would on N hosts (run the command N times / on each worker) with the environment the launcher
set, so the tests see the process ids and arguments each host would get."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

LAUNCH = REPO / "launch"
SLURM, TPU, K8S, LOCAL = (
    LAUNCH / "slurm.sbatch",
    LAUNCH / "tpu_pod.sh",
    LAUNCH / "k8s" / "launch.sh",
    LAUNCH / "local.sh",
)
# Overrides a shell would split or glob if a launcher quoted them wrongly.
TRAIN = ["flaxlm", "train", "configs/gpt_7b.yaml", "train.steps=100",
         "data.paths=[/shared/a b,/shared/c]", "train.run_dir=runs/it's"]  # fmt: skip
# A "command" that prints what one host would run with: its FLAXLM_* variables and argv.
REPORT = [sys.executable, "-c",
          "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': {k: v for k, v"
          " in os.environ.items() if k.startswith('FLAXLM_')}}))"]  # fmt: skip

FAKES = {
    # scontrol show hostnames LIST: the allocation's hosts, one a line.
    "scontrol": "print('gpu07\\ngpu08\\ngpu09\\ngpu10')",
    # srun: run the command once per task, with SLURM_PROCID and the --export variables;
    # FAKE_SRUN_EXIT: exit with that code instead; FAKE_SRUN_HOLD: wait for a SIGTERM (what a
    # task does when its job is signalled), then exit 0.
    "srun": """
import signal, time
if "FAKE_SRUN_EXIT" in os.environ:
    sys.exit(int(os.environ["FAKE_SRUN_EXIT"]))
if "FAKE_SRUN_HOLD" in os.environ:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Path(os.environ["FAKE_SRUN_HOLD"]).write_text(str(os.getpid()))
    time.sleep(20)
    sys.exit(1)
args = sys.argv[1:]
opts = {}
while args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
env = dict(os.environ)
for item in opts["export"].split(",")[1:]:
    key, _, value = item.partition("=")
    env[key] = value
for i in range(int(opts["ntasks"])):
    subprocess.run(args, env=env | {"SLURM_PROCID": str(i)}, check=True)
""",
    # scancel --signal=TERM JOB: signal the job's tasks (here: the held fake srun).
    "scancel": """
import signal
os.kill(int(Path(os.environ["FAKE_SRUN_HOLD"]).read_text()), signal.SIGTERM)
""",
    # gcloud compute tpus tpu-vm ssh NAME --worker=W --command=C: C on worker W (or on both
    # of 2 workers), each with its own home in FAKE_HOMES and none of this side's FLAXLM_*
    # variables. FAKE_SSH_DROPS: the numbers of the gcloud calls whose connection drops (exit
    # 255) before the command runs.
    "gcloud": """
command = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--command="))
worker = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--worker="))
with open(os.environ["FAKE_LOG"]) as f:
    n = sum(1 for line in f if line.startswith('["gcloud"'))
if str(n) in os.environ.get("FAKE_SSH_DROPS", "").split(","):
    sys.exit(255)
for i in range(2) if worker == "all" else [int(worker)]:
    home = Path(os.environ["FAKE_HOMES"]) / f"worker{i}"
    (home / "flaxlm").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAXLM_")}
    subprocess.run(["bash", "-c", command], env=env | {"HOME": str(home)}, check=True)
""",
    # kubectl apply -f -: keep the manifest it was given.
    "kubectl": """
Path(os.environ["FAKE_LOG"]).with_name("applied.yaml").write_text(sys.stdin.read())
""",
}


@pytest.fixture
def fakes(tmp_path):
    """PATH with the fake cluster tools first; each logs its argv to ``calls.jsonl``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    for name, body in FAKES.items():
        script = bin_dir / name
        script.write_text(
            f"#!{sys.executable}\nimport json, os, subprocess, sys\nfrom pathlib import Path\n"
            f"with open(os.environ['FAKE_LOG'], 'a') as f:\n"
            f"    f.write(json.dumps([{name!r}, *sys.argv[1:]]) + '\\n')\n{body}"
        )
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FLAXLM_"))}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "FAKE_LOG": str(log)}
    env |= {"FAKE_HOMES": str(tmp_path / "homes"), "FLAXLM_POLL_S": "0.1"}
    env.pop("DRY_RUN", None)

    def calls(argv: bool = False) -> list:
        lines = log.read_text().splitlines() if log.exists() else []
        return [json.loads(line) if argv else json.loads(line)[0] for line in lines]

    return env, calls


def _run(cmd, env, check=True):
    proc = subprocess.run(
        ["bash", *map(str, cmd)], env=env, capture_output=True, text=True, timeout=30
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _hosts(stdout: str) -> list[dict]:
    """The REPORT lines the hosts printed, ordered by process id where there is one."""
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: int(r["env"].get("FLAXLM_PROCESS_ID", 0)))


SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_NNODES": "4", "SLURM_JOB_ID": "123456"}


def test_every_launcher_is_valid_bash():
    launchers = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
    assert {SLURM, TPU, K8S, LOCAL} <= set(launchers)
    for path in launchers:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, (path, proc.stderr)
        assert os.access(path, os.X_OK), f"{path} should be executable"


def test_slurm_dry_run_prints_one_task_per_host_with_the_first_host_as_coordinator(fakes):
    env, calls = fakes
    out = _run([SLURM, "--dry-run", *TRAIN], env | SLURM_ENV).stdout
    directives = [line for line in out.splitlines() if line.startswith("#SBATCH")]
    srun, forward, requeue = out.splitlines()[len(directives) :]
    words = shlex.split(srun)
    assert words[0] == "srun"
    for flag in ("--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"):
        assert flag in words, (flag, out)
    # port 20000 + job id mod 20000
    assert "--export=ALL,FLAXLM_COORDINATOR=gpu07:23456,FLAXLM_NUM_PROCESSES=4" in words
    assert words[-len(TRAIN) :] == TRAIN
    assert calls() == ["scontrol"]  # only the host list was asked for; nothing was launched

    same = _run([SLURM, *TRAIN], env | SLURM_ENV | {"DRY_RUN": "1"}).stdout
    assert same == out
    port = _run([SLURM, "--dry-run", *TRAIN], env | SLURM_ENV | {"FLAXLM_PORT": "9999"}).stdout
    assert "FLAXLM_COORDINATOR=gpu07:9999" in port


def test_slurm_dry_run_shows_how_the_job_restarts(fakes):
    env, _ = fakes
    out = _run([SLURM, "--dry-run", *TRAIN], env | SLURM_ENV).stdout
    # A SIGTERM 300 s before the time limit, a requeueable job, one log across restarts.
    for directive in ("--requeue", "--signal=B:TERM@300", "--open-mode=append"):
        assert f"#SBATCH {directive}" in out.splitlines(), (directive, out)
    forward, requeue = out.splitlines()[-2:]
    assert shlex.split(forward, comments=True) == ["scancel", "--signal=TERM", "123456"]
    assert shlex.split(requeue, comments=True) == ["scontrol", "requeue", "123456"]
    assert "after exit 75 or a SIGTERM; requeue 1 of at most 20" in requeue
    later = _run([SLURM, "--dry-run", *TRAIN], env | SLURM_ENV | {"SLURM_RESTART_COUNT": "3"})
    assert "requeue 4 of at most 20" in later.stdout


def test_slurm_requeues_after_the_watchdog_exit_but_not_after_an_error(fakes):
    env, calls = fakes
    proc = _run([SLURM, *TRAIN], env | SLURM_ENV | {"FAKE_SRUN_EXIT": "75"}, check=False)
    assert proc.returncode == 75
    assert calls(argv=True)[-1] == ["scontrol", "requeue", "123456"]
    assert "exit 75; requeueing job 123456" in proc.stderr

    proc = _run([SLURM, *TRAIN], env | SLURM_ENV | {"FAKE_SRUN_EXIT": "2"}, check=False)
    assert proc.returncode == 2 and calls()[-1] == "srun"  # a bad config is not retried

    limit = {"FAKE_SRUN_EXIT": "75", "SLURM_RESTART_COUNT": "20"}
    proc = _run([SLURM, *TRAIN], env | SLURM_ENV | limit, check=False)
    assert proc.returncode == 75 and calls()[-1] == "srun"
    assert "not requeued: already requeued 20 times (FLAXLM_MAX_REQUEUES=20)" in proc.stderr


def test_slurm_passes_the_time_limit_sigterm_to_the_tasks_and_requeues(fakes, tmp_path):
    env, calls = fakes
    held = tmp_path / "srun.pid"
    proc = subprocess.Popen(
        ["bash", str(SLURM), *TRAIN],
        env=env | SLURM_ENV | {"FAKE_SRUN_HOLD": str(held)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 20
        while not held.exists() and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@300 does
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err  # the tasks saved and exited 0
    assert [c for c in calls(argv=True) if c[0] != "srun"][1:] == [
        ["scancel", "--signal=TERM", "123456"],
        ["scontrol", "requeue", "123456"],
    ]
    assert "exit 0 after SIGTERM; requeueing job 123456" in err


def test_slurm_run_gives_each_task_its_process_id(fakes):
    env, calls = fakes
    proc = _run([SLURM, *REPORT, "train", "data.paths=[a b]"], env | SLURM_ENV)
    hosts = _hosts(proc.stdout)
    assert [h["env"]["FLAXLM_PROCESS_ID"] for h in hosts] == ["0", "1", "2", "3"]
    for h in hosts:
        assert h["env"]["FLAXLM_COORDINATOR"] == "gpu07:23456"
        assert h["env"]["FLAXLM_NUM_PROCESSES"] == "4"
        assert h["argv"] == ["train", "data.paths=[a b]"]
    assert calls() == ["scontrol", "srun"]
    assert "4 processes, coordinator gpu07:23456" in proc.stderr


def test_slurm_outside_an_allocation_says_so(fakes):
    env, _ = fakes
    proc = _run([SLURM, "--dry-run", *TRAIN], env, check=False)
    assert proc.returncode == 2 and "submit it with sbatch" in proc.stderr


def test_tpu_pod_dry_run_prints_a_detached_start_then_the_polls(fakes):
    env, calls = fakes
    where = ["--zone", "us-central2-b", "--project", "p1", "--id", "run7"]
    out = _run([TPU, "--dry-run", *where, "pod-a", *TRAIN], env)
    start, status, log = (shlex.split(line, comments=True) for line in out.stdout.splitlines())
    for words, worker in ((start, "all"), (status, "all"), (log, "0")):
        assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a"]
        assert f"--worker={worker}" in words
        assert "--zone=us-central2-b" in words and "--project=p1" in words
    (command,) = [w.split("=", 1)[1] for w in start if w.startswith("--command=")]
    # What each worker's shell runs: the train command word for word, in its own session
    # (setsid nohup), so a dropped ssh connection does not hang it up.
    remote = shlex.split(command)
    assert remote[:2] == ["cd", "~/flaxlm"]
    job = remote[remote.index("bash") + 2]
    assert remote[remote.index("bash") - 2 : remote.index("bash") + 2] == [
        "setsid", "nohup", "bash", "-c"
    ]  # fmt: skip
    job_words = shlex.split(job)
    assert job_words[:1] == ["FLAXLM_DISTRIBUTED_AUTO=1"]
    assert job_words[1 : 1 + len(TRAIN)] == TRAIN
    assert "$HOME/.flaxlm-launch/run7/log" in command
    assert "flaxlm-worker running" in " ".join(status)
    assert calls() == []
    same = _run([TPU, *where, "pod-a", *TRAIN], env | {"DRY_RUN": "1"})
    assert same.stdout == out.stdout


def test_tpu_pod_run_reaches_every_worker_with_the_arguments_intact(fakes, tmp_path):
    env, calls = fakes
    proc = _run([TPU, "--id", "r1", "pod-a", *REPORT, "data.paths=[a b]", "it's"], env)
    logs = [tmp_path / f"homes/worker{i}/.flaxlm-launch/r1/log" for i in range(2)]
    hosts = [_hosts(log.read_text())[0] for log in logs]
    for h in hosts:
        assert h["env"] == {"FLAXLM_DISTRIBUTED_AUTO": "1"}  # jax finds the rest on TPU
        assert h["argv"] == ["data.paths=[a b]", "it's"]
    assert _hosts(proc.stdout) == hosts[:1]  # worker 0's log, followed
    assert "--attach r1 pod-a" in proc.stderr
    assert set(calls()) == {"gcloud"}


def test_tpu_pod_survives_dropped_connections_and_returns_the_exit_code(fakes, tmp_path):
    env, calls = fakes
    job = [sys.executable, "-c", "import time, sys; time.sleep(1); sys.exit(3)"]
    # Call 1 starts the job; calls 2-5 (two polls: log, then status) lose the connection.
    proc = _run([TPU, "--id", "r2", "pod-a", *job], env | {"FAKE_SSH_DROPS": "2,3,4,5"}, False)
    assert proc.returncode == 3, proc.stderr
    assert "poll failed (2 of 20); retrying" in proc.stderr
    assert "a worker exited 3" in proc.stderr
    # A start whose connection dropped is retried, and never starts a worker twice.
    proc = _run([TPU, "--id", "r3", "pod-a", *REPORT], env | {"FAKE_SSH_DROPS": "1"})
    again = _run([TPU, "--id", "r3", "pod-a", *REPORT], env)
    assert again.stdout.count("flaxlm-worker: launch r3 already started") == 2
    assert len(_hosts(again.stdout)) == 1  # worker 0's one report, from the first start


def test_tpu_pod_stop_sends_sigterm_and_the_launcher_sees_the_clean_exit(fakes, tmp_path):
    env, _ = fakes
    job = [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, "
           "lambda *_: sys.exit(0)); time.sleep(30); sys.exit(1)"]  # fmt: skip
    proc = subprocess.Popen(
        ["bash", str(TPU), "--id", "r4", "pod-a", *job],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        children = [tmp_path / f"homes/worker{i}/.flaxlm-launch/r4/child" for i in range(2)]
        deadline = time.time() + 20
        while not all(c.exists() for c in children) and time.time() < deadline:
            time.sleep(0.05)
        stop = _run([TPU, "--stop", "r4", "pod-a"], env)
        assert "SIGTERM sent to launch r4" in stop.stderr
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err


def _k8s_manifest(stdout: str) -> list[dict]:
    lines = stdout.splitlines()
    assert lines[0] == "kubectl apply -f - <<'EOF'" and lines[-1] == "EOF", stdout
    return list(yaml.safe_load_all("\n".join(lines[1:-1])))


def test_k8s_dry_run_prints_an_indexed_job_and_its_coordinator_service(fakes):
    env, calls = fakes
    cmd = [K8S, "--dry-run", "--name", "gpt7b", "--namespace", "ml", "--image", "reg/flaxlm:1",
           "--port", "8476", "--resource", "nvidia.com/gpu=8", "--pvc", "runs",
           "--max-restarts", "5", "--grace", "600", "4", *TRAIN]  # fmt: skip
    out = _run(cmd, env).stdout
    service, job = _k8s_manifest(out)
    assert calls() == []

    assert service["kind"] == "Service" and job["kind"] == "Job"
    assert service["metadata"] == {"name": "gpt7b", "namespace": "ml"}
    assert job["metadata"] == {"name": "gpt7b", "namespace": "ml"}
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"] == [{"name": "coordinator", "port": 8476}]

    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == 4
    pod = spec["template"]["spec"]
    # The Service selects exactly these pods, and they live in its DNS subdomain.
    assert service["spec"]["selector"] == spec["template"]["metadata"]["labels"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert pod["restartPolicy"] == "Never"
    # Restarts: failed pods are replaced, 5 times the group of 4 at most; evictions never
    # count, a diverged run (exit 3) is not retried; SIGTERM leaves 600 s to save.
    assert spec["backoffLimit"] == 5 * 4
    ignore, fail = spec["podFailurePolicy"]["rules"]
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert fail == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "flaxlm", "operator": "In", "values": [3]},
    }
    assert pod["terminationGracePeriodSeconds"] == 600

    (container,) = pod["containers"]
    assert container["image"] == "reg/flaxlm:1"
    assert container["command"] == TRAIN
    assert container["ports"] == [{"name": "coordinator", "containerPort": 8476}]
    env_vars = {e["name"]: e for e in container["env"]}
    # Indexed Job pod i is host NAME-i: process 0 is gpt7b-0 in the Service gpt7b.
    assert env_vars["FLAXLM_COORDINATOR"]["value"] == "gpt7b-0.gpt7b:8476"
    assert env_vars["FLAXLM_NUM_PROCESSES"]["value"] == "4"
    field = env_vars["FLAXLM_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "8"}}
    assert container["volumeMounts"] == [{"name": "runs", "mountPath": "/runs"}]
    assert pod["volumes"] == [{"name": "runs", "persistentVolumeClaim": {"claimName": "runs"}}]

    # Without the dry-run the same manifest goes to kubectl apply.
    _run([c for c in cmd if c != "--dry-run"], env)
    assert calls() == ["kubectl"]
    applied = Path(env["FAKE_LOG"]).with_name("applied.yaml").read_text()
    assert list(yaml.safe_load_all(applied)) == [service, job]


def test_k8s_defaults_and_bad_values(fakes):
    env, _ = fakes
    service, job = _k8s_manifest(_run([K8S, "2", *TRAIN], env | {"DRY_RUN": "1"}).stdout)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["spec"]["completions"] == 2
    assert job["spec"]["backoffLimit"] == 3 * 2  # 3 restarts of the group of 2
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    assert {e["name"]: e.get("value") for e in container["env"]}["FLAXLM_COORDINATOR"] == (
        "flaxlm-0.flaxlm:1234"
    )
    assert "resources" not in container and "volumes" not in job["spec"]["template"]["spec"]
    for bad, message in (
        (["--name", "GPT_7B", "2"], "should be a DNS label"),
        (["--resource", "gpu", "2"], "should be NAME=COUNT"),
        (["--max-restarts", "x", "2"], "--max-restarts 'x' should be a number"),
        (["0"], "usage:"),
    ):
        proc = _run([K8S, "--dry-run", *bad, *TRAIN], env, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (bad, proc.stderr)


def test_local_dry_run_env_matches_the_flag(fakes):
    env, _ = fakes
    env |= {"FLAXLM_PORT": "4321"}
    flag = _run([LOCAL, "--dry-run", "2", *TRAIN], env).stdout
    assert flag == _run([LOCAL, "2", *TRAIN], env | {"DRY_RUN": "1"}).stdout
    assert "FLAXLM_COORDINATOR=127.0.0.1:4321 FLAXLM_NUM_PROCESSES=2 FLAXLM_PROCESS_ID=1" in flag
