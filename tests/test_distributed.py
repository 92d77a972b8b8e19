"""Multi-process training through launch/local_multiprocess.sh, cluster detection, the TPU pod launcher,
and AOT plans for TPU topologies."""

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from optional import optional

from sft_sharded.parallel.distributed import cluster_kind

ROOT = Path(__file__).resolve().parents[1]
SFT = [sys.executable, "-m", "sft_sharded.cli"]
ARGS = ["steps=10", "log_every=1", "checkpoint.every=5", "eval.every=0", "eval.num_generate=8", "data.num_eval=16",
        "data.batch_size=8", "data.max_length=64", "data.shard_by=rows", "data.check_records=100",
        "optim.grad_accum_steps=2"]


def test_cluster_kind_detection():
    assert cluster_kind({}) == "single"
    assert cluster_kind({"SFT_COORDINATOR": "h:1", "SLURM_JOB_ID": "3"}) == "explicit"
    assert cluster_kind({"SLURM_JOB_ID": "3", "SLURM_NTASKS": "4"}) == "slurm"
    assert cluster_kind({"SLURM_JOB_ID": "3", "SLURM_NTASKS": "1"}) == "single"
    assert cluster_kind({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "tpu"
    assert cluster_kind({"TPU_WORKER_HOSTNAMES": "localhost"}) == "single"


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def sft_bin(tmp_path):
    """An `sft-sharded` executable for the launcher that runs this interpreter."""
    path = tmp_path / "sft-sharded"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -m sft_sharded.cli \"$@\"\n")
    path.chmod(0o755)
    return path


def test_every_process_is_refused_a_locked_run_dir_with_the_same_line(tmp_path):
    """Only process 0 reads the lock; the other process learns its verdict and stops too, with the same
    line, instead of waiting in its first collective for a process that has gone. Started without the
    launcher, which would kill the others itself."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(["sleep", "120"])  # a live process of this host holds the directory
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": 0.0}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([*SFT, "train", f"run_dir={run}", "simulate_devices=2", "steps=2"], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(env, SFT_COORDINATOR=f"127.0.0.1:{port}", SFT_NUM_PROCESSES="2",
                                       SFT_PROCESS_ID=str(i), JAX_PLATFORMS="cpu")) for i in range(2)]
    try:
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in [*procs, holder]:
            p.kill()
            p.wait()
    for i, (proc, (_, err)) in enumerate(zip(procs, results)):
        assert proc.returncode == 2, err[-2000:]
        assert err.strip().splitlines()[-1].startswith(
            f"sft-sharded: error: process {i} of 2: run_dir='{run}' is in use by pid {holder.pid} on host "
            f"{socket.gethostname()}"), err[-2000:]


@pytest.mark.slow
def test_two_processes_as_two_slices_match_one_process_and_hand_over_a_checkpoint(tmp_path):
    """2 processes x 4 devices as 2 slices (mesh.slices=2: the data axis spans them, each accumulating its
    own gradient over 2 micro-batches before the one sum across slices) against 1 process x 8 devices
    with the same global batch; then the 2-slice checkpoint continues in the single process."""
    env = dict(os.environ, SFT_BIN=str(sft_bin(tmp_path)), SFT_LOG_DIR=str(tmp_path / "logs"))
    env.pop("XLA_FLAGS", None)
    multi = subprocess.run([str(ROOT / "launch/local_multiprocess.sh"), "2", "4", "--", "train",
                            f"run_dir={tmp_path / 'multi'}", *ARGS, "mesh.slices=2"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    saved = {p.name for p in (tmp_path / "multi" / "checkpoints" / "5" / "data").iterdir()}
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= saved
    single = subprocess.run([*SFT, "train", f"run_dir={tmp_path / 'single'}", *ARGS], capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    got, want = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(got) == list(range(1, 11))
    np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-5)

    # the 2-process checkpoint at step 5 continues in one process, on the same data order
    handover = tmp_path / "handover"
    shutil.copytree(tmp_path / "multi", handover)
    shutil.rmtree(handover / "final_params")
    shutil.rmtree(handover / "checkpoints" / "10")  # continue from step 5
    resumed = subprocess.run([*SFT, "train", f"run_dir={handover}", *ARGS], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {handover / 'checkpoints'}/5" in resumed.stdout
    after = losses(handover)
    np.testing.assert_allclose([after[s] for s in range(6, 11)], [want[s] for s in range(6, 11)], rtol=1e-5)


@pytest.mark.slow
def test_a_failing_process_stops_the_others_and_is_named(tmp_path):
    env = dict(os.environ, SFT_BIN=str(sft_bin(tmp_path)), SFT_LOG_DIR=str(tmp_path / "logs"))
    env.pop("XLA_FLAGS", None)
    bad = subprocess.run([str(ROOT / "launch/local_multiprocess.sh"), "2", "4", "--", "train",
                          f"run_dir={tmp_path / 'run'}", "data.path=/nonexistent/*.jsonl", *ARGS], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "local_multiprocess: process" in bad.stderr and "matches no file" in bad.stderr


def test_tpu_pod_launcher_issues_the_right_gcloud_commands(tmp_path):
    record = tmp_path / "calls.txt"
    fake = tmp_path / "gcloud"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    fake.chmod(0o755)
    env = dict(os.environ, GCLOUD=str(fake), SFT_LOG_DIR=str(tmp_path / "logs"))
    result = subprocess.run([str(ROOT / "launch/tpu_pod.sh"), "--name", "pod4", "--zone", "us-east5-a",
                             "--project", "proj", "--env", "WANDB_MODE=offline", "--", "train", "steps=100",
                             "mesh.fsdp=-1"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    calls = record.read_text().splitlines()
    assert len(calls) == 4
    assert calls[0].startswith("compute tpus tpu-vm scp ") and "pod4:sft_sharded.tar.gz --worker=all" in calls[0]
    assert all("--zone us-east5-a --project proj" in c for c in calls)
    assert calls[1].startswith("compute tpus tpu-vm ssh pod4 --worker=all") and "pip install" in calls[1]
    assert "WANDB_MODE=offline python3 -m sft_sharded.cli train steps=100 mesh.fsdp=-1" in calls[2]
    assert "--worker=all" in calls[2] and "--worker=all" in calls[3]
    assert calls[3].startswith("compute tpus tpu-vm scp pod4:sft_sharded-*.log")
    dry = subprocess.run([str(ROOT / "launch/tpu_pod.sh"), "--name", "pod4", "--zone", "z", "--dry-run", "--",
                          "train"], env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and dry.stdout.count("tpu-vm") == 4
    assert len(record.read_text().splitlines()) == 4  # the dry run called nothing


def _plan(*args):
    """One `sft-sharded plan` at a time on this machine: libtpu refuses to start while another process
    holds its lock file, and `make test` runs two pytest workers."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(Path(tempfile.gettempdir()) / "sft_sharded_tests_plan.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return subprocess.run([*SFT, "plan", *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_plan_compiles_for_a_tpu_topology_fits_a_published_gemma3_shape_and_refuses_what_does_not_fit():
    optional("libtpu")
    # A whole 4x4x4 cube is a torus: compiled as one, its FSDP gathers are all-gathers (as an open mesh, the
    # TPU compiler turns each into an all-reduce of a zero-padded buffer, about twice the traffic). A v4
    # cube: its chips are one device each only when asked for ("megacore"), which the plan does.
    cube = _plan("--topology", "v4-128", "--model", "tiny", "--seq", "128", "--global-batch", "64")
    assert cube.returncode == 0, cube.stderr[-3000:]
    assert "on v4:4x4x4 (64 chips, torus)" in cube.stdout
    assert re.search(r"collectives per chip per step: all-gather \d+ x", cube.stdout), cube.stdout
    split = _plan("--topology", "v5p:2x2x1", "--model", "tiny", "--seq", "1024", "--global-batch", "2", "--mesh",
                  "fsdp=1,context=4", "--context-attention", "allgather")
    assert split.returncode == 0, split.stderr[-3000:]
    kernels = re.search(r"attention split sequence \(allgather, zigzag, splash per shard\) \((\d+) Pallas", split.stdout)
    assert kernels and int(kernels.group(1)) > 0, split.stdout
    # Full fine-tuning, then LoRA, of one model in one call.
    lora = _plan("--topology", "v5p:2x2x1", "--model", "llama3.2-1b", "--seq", "128", "--global-batch", "8",
                 "--lora-rank", "4")
    assert lora.returncode == 0, lora.stderr[-3000:]
    mesh = "on v5p:2x2x1 (4 chips, open mesh), mesh {'data': 1, 'fsdp': 4, 'expert': 1, 'context': 1, 'tensor': 1}"
    assert mesh in lora.stdout and "-> fits" in lora.stdout and "FLOPs per chip per step: compiler" in lora.stdout
    assert re.search(r"collectives per chip per step: all-gather \d+ x", lora.stdout)  # fsdp=4 gathers weights
    assert "attention splash (" in lora.stdout and "Pallas calls)" in lora.stdout  # "auto" on TPU: the kernel
    full_line, lora_line = [line for line in lora.stdout.splitlines() if line.startswith("plan:")]
    assert full_line.endswith("full fine-tuning") and lora_line.endswith(
        "LoRA rank 4 on q,k,v,o,gate,up,down over a bfloat16 base")
    memory = [float(m) for m in re.findall(r"= ([0-9.]+) GiB of", lora.stdout)]
    assert len(memory) == 2 and memory[1] < memory[0]  # LoRA's step needs less than full fine-tuning's
    # Two slices of v5p:2x2x1 over DCN: the data axis spans them, the gradient's all-reduce crosses DCN
    # (the TPU compiler's per-slice program hands it to the DCN transport), the fsdp gathers stay in a slice.
    slices = _plan("--topology", "v5p:2x2x1", "--slices", "2", "--model", "tiny", "--seq", "128", "--global-batch",
                   "16", "--mesh", "data=2,fsdp=-1")
    assert slices.returncode == 0, slices.stderr[-3000:]
    assert "on v5p:2x2x1 (8 chips, open mesh, 2 slices over DCN), mesh {'data': 2, 'fsdp': 4," in slices.stdout
    dcn = re.search(r"across slices \(DCN\): all-reduce (\d+) x [0-9.]+ MiB; DCN ([0-9.]+) MiB", slices.stdout)
    assert dcn and int(dcn.group(1)) > 0, slices.stdout
    assert not re.search(r"across slices.*all-gather", slices.stdout)
    # 4 micro-batches: each slice accumulates its own gradient and the slices sum it once, so no more sends
    # over DCN than with one micro-batch (whose bf16 gradients go layer by layer; the sum of the float32
    # accumulated gradient moves more bytes, but once, not once per micro-batch)
    accumulated = _plan("--topology", "v5p:2x2x1", "--slices", "2", "--model", "tiny", "--seq", "128",
                        "--global-batch", "32", "--mesh", "data=2,fsdp=-1", "--grad-accum", "4")
    assert accumulated.returncode == 0, accumulated.stderr[-3000:]
    assert "32 x 128 tokens per step in 4 micro-batches" in accumulated.stdout
    sends = re.search(r"across slices \(DCN\): all-reduce (\d+) x [0-9.]+ MiB; DCN ([0-9.]+) MiB", accumulated.stdout)
    assert sends and int(sends.group(1)) <= int(dcn.group(1)), accumulated.stdout
    assert float(sends.group(2)) < 4 * float(dcn.group(2)), accumulated.stdout
    straddle = _plan("--topology", "v5p:2x2x1", "--slices", "2", "--model", "tiny", "--mesh", "fsdp=-1")
    assert straddle.returncode == 2 and straddle.stderr.strip().splitlines()[-1].startswith(
        "sft-sharded: error: mesh.data=1 is not a multiple of mesh.slices=2"), straddle.stderr[-2000:]
    too_big = _plan("--topology", "v6e-1", "--model", "llama3.1-8b", "--seq", "8192", "--global-batch", "8")
    assert too_big.returncode == 1 and "on v6e:1x1 (1 chip, open mesh)" in too_big.stdout  # a single chip lays out
    assert "DOES NOT FIT" in too_big.stdout and "does not fit" in too_big.stderr
    # A real shape compiles for the TPU: Gemma 3's mixed local/global scan (a lax.cond per layer, so both
    # splash kernels are in) and its 262k vocabulary (the chunked loss by default). gemma3-1b at 4096
    # positions has both and compiles in 34 s here (gemma3-4b at 8192: 83 s, benchmarks/README.md). In this
    # test, not a second one: libtpu takes one process at a time, and a second test would hold a pytest
    # worker idle on the lock while this one compiles.
    result = _plan("--topology", "v5p-16", "--model", "gemma3-1b", "--seq", "4096", "--global-batch", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on v5p:2x2x2 (8 chips, open mesh)" in result.stdout and "-> fits" in result.stdout
    gib = float(re.search(r"= ([0-9.]+) GiB of 95 GiB HBM", result.stdout).group(1))
    assert 2 < gib < 95
    assert "loss chunk 1024" in result.stdout and "(8 Pallas calls)" in result.stdout
