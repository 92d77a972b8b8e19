"""Faults a real run meets, through the CLI: what it prints, its exit status, and what is on disk after.

Two runs on one run directory (the lock), a disk that fills during a checkpoint (a stubbed write, a stubbed
free-space reading and a real 1 MiB tmpfs), Ctrl-C (a real SIGINT to this process) then a resume equal to
the uninterrupted run, a held-out file broken at its end. The corrupt checkpoint is in test_errors.py."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from optional import optional
from test_errors import FAST, assert_one_line, cli, jsonl, CHAT

from sft_sharded import cli as cli_module
from sft_sharded.rundir import checkpoint
from sft_sharded.cli import main
from sft_sharded.rundir.lock import RunDirInUse, RunLock


def checkpoints(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def write_lock(run, pid):
    run.mkdir(parents=True, exist_ok=True)
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "since": time.time()}))


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_the_lock_names_its_holder_is_released_and_a_stale_one_is_taken_over(tmp_path):
    lines = []
    with RunLock(tmp_path, warn=lines.append) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        with pytest.raises(RunDirInUse, match=f"is in use by pid {os.getpid()} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()
    write_lock(tmp_path, pid := dead_pid())
    with RunLock(tmp_path, warn=lines.append):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert lines == [f"warning: {tmp_path / '.lock'} was left by pid {pid}, which is no longer running on this "
                     "host; taking the run directory over"]


def test_a_second_run_on_a_locked_run_dir_is_refused_at_once_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(["sleep", "60"])  # a live process of this host holds the directory
    try:
        write_lock(run, holder.pid)
        before = sorted(p.name for p in run.iterdir())
        status, err = cli(capsys, "train", *FAST, f"run_dir={run}")
        assert_one_line(status, err, f"run_dir='{run}' is in use by pid {holder.pid} on host {socket.gethostname()}")
        assert f"({run / '.lock'}); wait for that run to end or choose another run_dir" in err
        assert "data:" not in capsys.readouterr().out  # refused before the data was read
        assert sorted(p.name for p in run.iterdir()) == before
        assert json.loads((run / ".lock").read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_save_that_does_not_fit_stops_before_writing(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real, calls = shutil.disk_usage, []

    def filling(path):  # room for two checkpoints, then 1 MiB left (the state is ~10 MiB)
        calls.append(path)
        return real(path) if len(calls) <= 2 else real(path)._replace(free=2**20)

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", filling)
    status, err = cli(capsys, "train", *FAST, f"run_dir={run}", "steps=4", "checkpoint.every=1")
    assert_one_line(status, err, f"checkpoint {run / 'checkpoints'}/3 was not saved: it needs up to 10.1 MiB and "
                                 "its file system has 1.0 MiB free; the newest checkpoint, ")
    assert f"{run / 'checkpoints'}/2, is intact; the run stopped" in err
    assert checkpoints(run) == ["1", "2"]


def test_a_write_that_fails_mid_save_removes_its_temporary_directory(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    seen = []

    def full(self, directory, args):  # the data item is written into orbax's temporary step directory
        seen.extend(p.name for p in (run / "checkpoints").iterdir())
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(checkpoint.DataStateHandler, "save", full)
    status, err = cli(capsys, "train", *FAST, f"run_dir={run}", "steps=3", "checkpoint.every=2")
    assert_one_line(status, err, f"checkpoint {run / 'checkpoints'}/2 was not saved: the disk is full (")
    assert "its temporary directory was removed and no checkpoint was saved before it; the run stopped" in err
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in seen), seen
    assert checkpoints(run) == []
    assert not (run / "final_params").exists() and not (run / ".lock").exists()


def mount_tmpfs_works() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(shutil.which("unshare") is None or not mount_tmpfs_works(),
                    reason="needs a private mount namespace to mount a small tmpfs (root, or unprivileged user "
                           "namespaces); the two stubbed tests above cover the same code")
def test_a_real_full_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {disk} && {sys.executable} -m sft_sharded.cli train "
              f"{' '.join(FAST[1:])} checkpoint.every=2 run_dir={disk}/run; echo status=$?; ls -A {disk}/run/checkpoints")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("sft-sharded:")]
    assert errors == [f"sft-sharded: error: checkpoint {disk}/run/checkpoints/2 was not saved: it needs up to 10.1 "
                      "MiB and its file system has 1.0 MiB free; no checkpoint was saved before it; the run stopped"], \
        result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stdout.splitlines()[-1] == "status=2"  # and `ls` of the checkpoints printed nothing


@pytest.mark.skipif(shutil.which("unshare") is None or not mount_tmpfs_works(),
                    reason="needs a private mount namespace to mount a small tmpfs (root, or unprivileged user "
                           "namespaces)")
def test_a_disk_that_fills_during_an_asynchronous_save_is_one_line(tmp_path):
    """The free-space check passes (the disk is said to have 10 GiB, as when another process fills it
    after the check), so orbax's background writers fail one by one: stderr is still the one line, without
    their hundreds of logged tracebacks, and no temporary directory is left behind."""
    disk, site = tmp_path / "disk", tmp_path / "site"
    disk.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import shutil\nreal = shutil.disk_usage\n"
        "shutil.disk_usage = lambda path: real(path)._replace(free=10 * 2**30)\n")
    script = (f"mount -t tmpfs -o size=1m tmpfs {disk} && PYTHONPATH={site} {sys.executable} -m sft_sharded.cli "
              f"train {' '.join(FAST[1:])} checkpoint.every=2 run_dir={disk}/run; echo status=$?; "
              f"ls -A {disk}/run/checkpoints")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stderr.splitlines() == [
        f"sft-sharded: error: checkpoint {disk}/run/checkpoints/2 was not saved: the disk is full (10,240.0 MiB free "
        "on its file system); its temporary directory was removed and no checkpoint was saved before it; the run "
        "stopped"], result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "status=2"  # and `ls` of the checkpoints printed nothing


def sigint_at(monkeypatch, steps):
    """Send SIGINT to this process when the progress printer sees each of `steps` (the real handler)."""
    record = cli_module.Progress.record

    def record_and_interrupt(self, r):
        record(self, r)
        if r.get("step") in steps and "loss" in r:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cli_module.Progress, "record", record_and_interrupt)


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_ctrl_c_saves_exits_130_and_the_resume_equals_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    args = [*FAST, "steps=6", "checkpoint.every=0", "checkpoint.async_save=false"]
    assert main(["train", *args, f"run_dir={tmp_path / 'straight'}"]) == 0
    capsys.readouterr()
    before = signal.getsignal(signal.SIGINT)  # not always Python's default: an earlier test may have set one
    with monkeypatch.context() as patch:
        sigint_at(patch, {3})
        assert main(["train", *args, f"run_dir={tmp_path / 'run'}"]) == 130
    out = capsys.readouterr().out
    assert "Ctrl-C: saving a checkpoint at the end of this step (Ctrl-C again stops at once)" in out
    saved = [line for line in out.splitlines() if line.startswith("interrupted: saved")]
    assert len(saved) == 1 and saved[0].endswith("; the same command resumes from it"), out
    step = int(saved[0].split("/")[-1].split(";")[0])
    assert 3 <= step < 6 and checkpoints(tmp_path / "run") == [str(step)]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back
    assert main(["train", *args, f"run_dir={tmp_path / 'run'}"]) == 0
    assert f"trained {6 - step} steps ({step + 1}-6)" in capsys.readouterr().out
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


def test_a_second_ctrl_c_stops_at_once(tmp_path, capsys, monkeypatch):
    sigint_at(monkeypatch, {2, 3})
    status, err = cli(capsys, "train", *FAST, "steps=8", f"run_dir={tmp_path / 'run'}", "checkpoint.every=0")
    assert_one_line(status, err.replace("sft-sharded: interrupted", "sft-sharded: error: interrupted"),
                    "interrupted: stopped at once (nothing saved since the last checkpoint)", code=130)
    assert checkpoints(tmp_path / "run") == [] and not (tmp_path / "run" / ".lock").exists()


def test_a_held_out_file_broken_at_its_end_is_found_before_training(tmp_path, capsys):
    train = jsonl(tmp_path / "train.jsonl", *[CHAT] * 8)
    held_out = jsonl(tmp_path / "held_out.jsonl", *[CHAT] * 5, '{"messages": [')
    status, err = cli(capsys, "train", *FAST, "steps=4", f"run_dir={tmp_path / 'run'}", f"data.path={train}",
                      f"data.eval_path={held_out}")
    assert_one_line(status, err, "held_out.jsonl:6: malformed JSON")
    assert not (tmp_path / "run").exists()


def test_a_step_that_cannot_fit_is_refused_before_it_runs(tmp_path, capsys, monkeypatch):
    from sft_sharded.parallel import memory

    monkeypatch.setattr(memory, "host_available_bytes", lambda: 2**20)  # a host with 1 MiB free
    status, err = cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run'}")
    assert_one_line(status, err, "the train step needs ")
    assert " GiB per device x 8 simulated devices sharing this host's RAM), but the host has 0.00 GiB available; it " \
           "would be killed: try fewer simulated devices (simulate_devices=1 with mesh.data=1 mesh.fsdp=1 " \
           "mesh.tensor=1), LoRA (lora.rank=8), model.remat=full model.scan_layers=true, a shorter " \
           "data.max_length (now 32)" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # no step ran


def test_xla_running_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    import jax

    from sft_sharded import run

    def oom(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25769803776 "
                                         "bytes.\nBufferAssignment OOM Debugging.\n...")

    monkeypatch.setattr(run, "train", oom)
    status, err = cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run'}")
    assert_one_line(status, err, "out of memory: RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                 "25769803776 bytes.")


def test_a_bucket_without_credentials_is_refused_at_once(tmp_path, capsys, monkeypatch):
    optional("gcsfs")
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no gcloud login there
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # and not a Google Cloud VM (its metadata server is not asked)
    t0 = time.monotonic()
    status, err = cli(capsys, "train", *FAST, "run_dir=gs://no-such-bucket/run")
    assert_one_line(status, err, "run_dir='gs://no-such-bucket/run': writing to a bucket needs credentials, and no "
                                 "Google Cloud credentials were found (set GOOGLE_APPLICATION_CREDENTIALS or run "
                                 "`gcloud auth application-default login`)")
    assert time.monotonic() - t0 < 10


def test_a_bucket_that_does_not_answer_is_one_line_after_a_bounded_wait(monkeypatch):
    from sft_sharded.rundir import paths
    from sft_sharded.errors import UserError

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/keys/sa.json")
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"^run_dir='gs://b/run': the bucket cannot be reached \(no answer in 1 s\); "
                                        r"credentials: GOOGLE_APPLICATION_CREDENTIALS=/keys/sa.json$"):
        paths.bounded(lambda: time.sleep(30), "gs://b/run", "run_dir", timeout_s=1)  # a network that drops packets
    assert time.monotonic() - t0 < 5
    with pytest.raises(UserError, match=r"the bucket cannot be reached \(ConnectionError: refused\)"):
        paths.bounded(lambda: (_ for _ in ()).throw(ConnectionError("refused")), "gs://b/run", "run_dir")
    paths.bounded(lambda: None, "gs://b/run", "run_dir")  # an answer: nothing raised


def test_a_data_bucket_that_never_answers_is_one_line_before_anything_is_compiled(tmp_path, capsys, monkeypatch):
    """A storage endpoint that accepts connections and never answers (a network that drops replies): the
    first access to data.path is bounded, and the run stops in one line naming the key and the bucket."""
    optional("gcsfs")
    import gcsfs
    from etils import epath

    from sft_sharded.rundir import paths

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        monkeypatch.setattr(paths, "FIRST_ACCESS_TIMEOUT_S", 2.0)
        epath.backend.fsspec_backend._get_filesystem.cache_clear()
        gcsfs.GCSFileSystem.clear_instance_cache()
        t0 = time.monotonic()
        status, err = cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run'}", "data.path=gs://quiet/data/*.jsonl")
        elapsed = time.monotonic() - t0
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith("sft-sharded: error: data.path='gs://quiet/data/*.jsonl': the bucket cannot be reached ("), err
    assert elapsed < 20 and not (tmp_path / "run").exists()
