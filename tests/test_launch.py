"""The cluster launchers in launch/: syntax, dry-runs, and runs against fake srun / gcloud /
kubectl, so SLURM, TPU pods and Kubernetes are checked here without any of them.

Each fake is a tiny script first on PATH. The fakes of srun and gcloud do what the real ones
would on N hosts (run the command N times / on each worker) with the environment the launcher
set, so the tests see the process ids and arguments each host would get."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
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
    # srun: run the command once per task, with SLURM_PROCID and the --export variables.
    "srun": """
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
    # gcloud compute tpus tpu-vm ssh NAME --worker=all --command=C: C on 2 workers.
    "gcloud": """
command = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--command="))
for worker in range(2):
    subprocess.run(["bash", "-c", command], check=True)
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
    env.pop("DRY_RUN", None)

    def calls() -> list[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        return [json.loads(line)[0] for line in lines]

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
    words = shlex.split(out)
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


def test_tpu_pod_dry_run_prints_the_gcloud_command_for_all_workers(fakes):
    env, calls = fakes
    where = ["--zone", "us-central2-b", "--project", "p1"]
    out = _run([TPU, "--dry-run", *where, "pod-a", *TRAIN], env)
    words = shlex.split(out.stdout)
    assert words[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a", "--worker=all"]
    assert "--zone=us-central2-b" in words and "--project=p1" in words
    (command,) = [w.split("=", 1)[1] for w in words if w.startswith("--command=")]
    # What each worker's shell runs: auto-detection on, the train command word for word.
    remote = shlex.split(command)
    assert remote[:4] == ["cd", "~/flaxlm", "&&", "FLAXLM_DISTRIBUTED_AUTO=1"]
    assert remote[4:] == TRAIN
    assert calls() == []
    assert _run([TPU, *where, "pod-a", *TRAIN], env | {"DRY_RUN": "1"}).stdout == out.stdout


def test_tpu_pod_run_reaches_every_worker_with_the_arguments_intact(fakes, tmp_path):
    env, calls = fakes
    proc = _run([TPU, "--workdir", tmp_path, "pod-a", *REPORT, "data.paths=[a b]", "it's"], env)
    hosts = _hosts(proc.stdout)
    assert len(hosts) == 2
    for h in hosts:
        assert h["env"] == {"FLAXLM_DISTRIBUTED_AUTO": "1"}  # jax finds the rest on TPU
        assert h["argv"] == ["data.paths=[a b]", "it's"]
    assert calls() == ["gcloud"]


def _k8s_manifest(stdout: str) -> list[dict]:
    lines = stdout.splitlines()
    assert lines[0] == "kubectl apply -f - <<'EOF'" and lines[-1] == "EOF", stdout
    return list(yaml.safe_load_all("\n".join(lines[1:-1])))


def test_k8s_dry_run_prints_an_indexed_job_and_its_coordinator_service(fakes):
    env, calls = fakes
    cmd = [K8S, "--dry-run", "--name", "gpt7b", "--namespace", "ml", "--image", "reg/flaxlm:1",
           "--port", "8476", "--resource", "nvidia.com/gpu=8", "--pvc", "runs", "4",
           *TRAIN]  # fmt: skip
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
    assert spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    # The Service selects exactly these pods, and they live in its DNS subdomain.
    assert service["spec"]["selector"] == spec["template"]["metadata"]["labels"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert pod["restartPolicy"] == "Never"

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
    assert {e["name"]: e.get("value") for e in container["env"]}["FLAXLM_COORDINATOR"] == (
        "flaxlm-0.flaxlm:1234"
    )
    assert "resources" not in container and "volumes" not in job["spec"]["template"]["spec"]
    for bad, message in (
        (["--name", "GPT_7B", "2"], "should be a DNS label"),
        (["--resource", "gpu", "2"], "should be NAME=COUNT"),
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
