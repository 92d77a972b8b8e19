"""The Ray launcher against a real local Ray cluster (`ray start --head` in a fixture, stopped after it): 2
actors x 4 simulated CPU devices as 2 slices give the per-step losses of 1 process x 8 devices; killing one
actor's process mid-run restarts the group and ends in the same parameters as an uninterrupted run; a user's
mistake fails once, with its one line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from optional import optional

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(ROOT / "launch/ray_launch.py")]
ARGS = ["steps=6", "log_every=1", "checkpoint.every=2", "checkpoint.async_save=false", "eval.every=0",
        "eval.num_generate=0", "data.num_eval=16", "data.batch_size=8", "data.max_length=64", "data.shard_by=rows",
        "data.check_records=100"]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A one-node Ray cluster of this machine, started and stopped here (bounded in time)."""
    optional("ray")
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("XLA_FLAGS", None)
    ray = [str(Path(sys.executable).parent / "ray")]
    start = subprocess.run([*ray, "start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=false",
                            "--object-store-memory=100000000", "--disable-usage-stats",
                            f"--temp-dir={tmp_path_factory.mktemp('ray')}"], env=env, capture_output=True, text=True,
                           timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([*ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def losses(run_dir):
    """Each step's loss as last logged (a resumed run logs the replayed steps again)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def final_params(run_dir):
    """The run's final parameters as host arrays, restored on one device whatever mesh saved them."""
    ocp = pytest.importorskip("orbax.checkpoint")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(run_dir / "final_params").item_metadata
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        return jax.tree.map(np.asarray, ckpt.restore(run_dir / "final_params", target))


def launch(address, env, tmp_path, name, *extra, kill_after_checkpoint=None):
    """Run the launcher to its end; with `kill_after_checkpoint`, SIGKILL process 1's actor once that
    checkpoint exists."""
    run = tmp_path / name
    err_file = tmp_path / f"{name}.err"
    with open(err_file, "w") as err:
        proc = subprocess.Popen([*LAUNCH, "--hosts", "2", "--devices-per-host", "4", "--address", address,
                                 "--log-dir", str(tmp_path / f"{name}-logs"), "--", "train", f"run_dir={run}", *ARGS,
                                 "mesh.slices=2", *extra], env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        killed = None
        deadline = time.monotonic() + 420
        while proc.poll() is None and time.monotonic() < deadline:
            if kill_after_checkpoint and killed is None and (run / "checkpoints" / str(kill_after_checkpoint)).is_dir():
                line = next(x for x in err_file.read_text().splitlines() if "attempt 0: process 1 runs in actor pid" in x)
                killed = int(line.split("actor pid ")[1].split()[0])
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
        out, _ = proc.communicate(timeout=60)
    return proc.returncode, out, err_file.read_text(), run, killed


def test_two_actors_match_one_process_a_killed_actor_restarts_to_the_same_parameters_and_a_mistake_fails_once(
        ray_cluster, tmp_path):
    """One test on one cluster: `ray stop` ends every Ray process of the machine, so two tests on two pytest
    workers would stop each other's cluster."""
    address, env = ray_cluster
    code, out, err, _, _ = launch(address, env, tmp_path, "bad", "data.path=/nonexistent/*.jsonl")
    assert code == 2, err[-3000:]
    assert "restarting" not in err
    assert err.strip().splitlines()[-1].startswith("sft-sharded: error:") and "matches no file" in err

    code, out, err, straight, _ = launch(address, env, tmp_path, "straight")
    assert code == 0, err[-3000:]
    assert "finished after 0 restarts" in err
    # process 0's output, all of it, in its log file (Ray's forwarding of the stream to the driver is best
    # effort: under load it lags behind the run, so the test does not count on it)
    assert "trained 6 steps (1-6)" in (tmp_path / "straight-logs" / "attempt_0" / "process_0.log").read_text()
    single = subprocess.run([sys.executable, "-m", "sft_sharded.cli", "train", f"run_dir={tmp_path / 'single'}",
                             *ARGS], env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    got, want = losses(straight), losses(tmp_path / "single")
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)

    code, out, err, resumed, killed = launch(address, env, tmp_path, "killed", kill_after_checkpoint=2)
    assert killed is not None, err[-3000:]
    assert code == 0, err[-3000:]
    assert "attempt 0: process 1 failed: its actor died" in err and "restarting the group (1 of at most 3)" in err
    assert "finished after 1 restart" in err
    assert "resumed from" in (tmp_path / "killed-logs" / "attempt_1" / "process_0.log").read_text()
    assert losses(resumed) == losses(straight)  # bit for bit
    a, b = final_params(resumed), final_params(straight)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
