"""launch/slurm_gpu.sbatch under a real SLURM: a one-node controller and daemon on localhost (Debian's
slurm-wlm, with munge for authentication), started in a temporary directory by the fixture and stopped
after it. The script's CPU variant (2 tasks x 4 simulated devices) gives the per-step losses of 1 process
x 8 devices."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["steps=4", "log_every=1", "checkpoint.every=0", "eval.every=0", "eval.num_generate=0", "data.batch_size=8",
        "data.max_length=64", "data.shard_by=rows", "data.check_records=100"]
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {seconds} s")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a one-node cluster on this machine (root only: slurmd runs jobs as their user)."""
    missing = [d for d in DAEMONS if not shutil.which(d) and not Path("/usr/sbin", d).exists()]
    if missing or os.geteuid() != 0:
        reason = f"needs {', '.join(missing)} (Debian's slurm-wlm and munge)" if missing else "needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the SLURM test {reason}; `make test` installs them")
        pytest.skip(f"the SLURM test {reason}")
    top = tmp_path_factory.mktemp("slurm")
    top.chmod(0o700)  # munged refuses a key or socket directory others can write
    host = socket.gethostname().split(".")[0]
    sock = top / "munge.sock"
    subprocess.run(["mungekey", "-c", "-k", str(top / "munge.key")], check=True, capture_output=True, timeout=30)
    subprocess.run(["munged", "--force", "-S", str(sock), f"--key-file={top / 'munge.key'}",
                    f"--log-file={top / 'munged.log'}", f"--pid-file={top / 'munged.pid'}",
                    f"--seed-file={top / 'munged.seed'}"], check=True, capture_output=True, timeout=30)
    for name in ("state", "spool"):
        (top / name).mkdir()
    conf = top / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=sfttest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "AuthType=auth/munge", f"AuthInfo=socket={sock}",
        f"StateSaveLocation={top / 'state'}", f"SlurmdSpoolDir={top / 'spool'}",
        f"SlurmctldPidFile={top / 'slurmctld.pid'}", f"SlurmdPidFile={top / 'slurmd.pid'}",
        f"SlurmctldLogFile={top / 'slurmctld.log'}", f"SlurmdLogFile={top / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "ReturnToService=2", "MpiDefault=none",
        "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""]))
    env = dict(os.environ, SLURM_CONF=str(conf))
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env, timeout=60)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env, timeout=60)
        wait_for(lambda: subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True,
                                        timeout=30).stdout.strip() == "idle", 60, "the node becoming idle")
        yield env
    finally:
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            if (top / pid_file).is_file():
                try:
                    os.kill(int((top / pid_file).read_text()), 15)
                except ProcessLookupError:
                    pass  # already gone: nothing to stop
        for name in ("slurmctld.log", "slurmd.log"):
            if (top / name).is_file():
                print(f"--- {name}\n{(top / name).read_text()[-2000:]}")


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_the_sbatch_script_runs_two_tasks_to_the_losses_of_one_process(slurm, tmp_path):
    env = dict(slurm, SFT_PYTHON=sys.executable, SFT_SIMULATE_DEVICES="4", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    job = subprocess.run(["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                          "--cpus-per-task=1", str(ROOT / "launch/slurm_gpu.sbatch"), "train",
                          f"run_dir={tmp_path / 'slurm'}", *ARGS], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    output = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert job.returncode == 0, job.stderr + output[-3000:]
    assert "0: trained 4 steps (1-4)" in output  # task 0's lines, labelled by srun
    single = subprocess.run([sys.executable, "-m", "sft_sharded.cli", "train", f"run_dir={tmp_path / 'single'}",
                             *ARGS], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    got, want = losses(tmp_path / "slurm"), losses(tmp_path / "single")
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)], rtol=1e-5)
