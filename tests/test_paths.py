"""paths.py, the one file-system layer: data, model, run directory (checkpoints, metrics, final params) and
exports in a bucket. The bucket is a GCS emulator (gcp-storage-emulator, an HTTP server in this process
that speaks the GCS JSON API), reached by the clients a TPU VM uses: gcsfs for files and tensorstore for
orbax's tensors. The reference for every byte is the same run on the local disk."""

import json
import os
import pathlib
import socket
from http import HTTPStatus

import numpy as np
import pytest
from optional import optional
from etils import epath
from test_errors import FAST, assert_one_line, cli, write_model_dir

from sft_sharded.rundir import paths
from sft_sharded.cli import main
from sft_sharded.data.sources import expand_paths, open_source
from sft_sharded.errors import UserError
from sft_sharded.rundir.lock import RunDirInUse, RunLock

# gcsfs asks Google's control plane (with credentials) whether a bucket is zonal or hierarchical before
# listing it; the emulator has neither, and this machine no credentials. Read when gcsfs is imported.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
emulator = optional("gcp_storage_emulator.server")
optional("gcsfs")

CHATS = [{"messages": [{"role": "user", "content": f"sort {i} {i % 3}"},
                       {"role": "assistant", "content": f"{i % 3} {i}"}]} for i in range(24)]


def _clear_client_caches():
    import gcsfs

    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()


def _send_generation_headers():
    """Make the emulator's media downloads carry `x-goog-generation`, as GCS's do: tensorstore reads an
    object's generation from that header (without it: "Malformed StorageGeneration")."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    plain = getattr(objects.download, "__wrapped__", objects.download)

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:  # the 404 is already in the response
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

    download.__wrapped__ = plain
    objects.download = download  # `objects.get` (alt=media) calls it by this name
    for _, methods in server.HANDLERS:
        for method, handler in methods.items():
            if getattr(handler, "__wrapped__", handler) is plain:
                methods[method] = download


def _refuse_a_second_create():
    """Make the emulator honour `ifGenerationMatch=0` on uploads as GCS does: 412 Precondition Failed when
    the object exists (the emulator ignores the precondition and overwrites)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    plain = getattr(objects.insert, "__wrapped__", objects.insert)

    def insert(request, response, storage, *args, **kwargs):
        if request.query.get("ifGenerationMatch") == ["0"]:
            name = request.query["name"][0] if "name" in request.query else request.data["meta"].get("name")
            try:
                storage.get_file_obj(request.params["bucket_name"], name)
            except NotFound:
                pass  # absent: the create goes ahead
            else:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        return plain(request, response, storage, *args, **kwargs)

    insert.__wrapped__ = plain
    for _, methods in server.HANDLERS:
        for method, handler in methods.items():
            if getattr(handler, "__wrapped__", handler) is plain:
                methods[method] = insert


@pytest.fixture(scope="module")
def bucket():
    _send_generation_headers()
    _refuse_a_second_create()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="bkt")
    server.start()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    _clear_client_caches()
    try:
        yield "gs://bkt"
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        _clear_client_caches()
        server.stop()


def upload(local, remote: str) -> None:
    """Copy a local file or folder to the bucket."""
    local = pathlib.Path(local)
    for item in [local] if local.is_file() else [p for p in local.rglob("*") if p.is_file()]:
        target = epath.Path(remote) / item.relative_to(local) if item != local else epath.Path(remote)
        target.write_bytes(item.read_bytes())


def test_unknown_schemes_and_missing_clients_are_refused_by_name(monkeypatch):
    with pytest.raises(UserError, match=r"data.path='memory://x/a.jsonl': unsupported URL scheme 'memory://'"):
        paths.path("memory://x/a.jsonl", "data.path")
    with pytest.raises(UserError, match=r"data.path='data/\*\*/\*.jsonl': '\*\*' is not supported"):
        paths.glob("data/**/*.jsonl", "data.path")
    monkeypatch.setattr(paths.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"run_dir='gs://b/r': gs:// paths need the gcsfs package: "
                                        r"pip install 'sft_sharded\[gcs\]'"):
        paths.path("gs://b/r", "run_dir")


def test_records_read_from_a_bucket_equal_the_records_written(bucket, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in CHATS[:10]))
    upload(jsonl, f"{bucket}/src/a/part-0.jsonl")
    upload(jsonl, f"{bucket}/src/b/part-1.jsonl")
    table = pa.Table.from_pylist(CHATS)
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=5)  # several row groups: ranged reads
    upload(tmp_path / "x.parquet", f"{bucket}/repo/data/train-00000-of-00001.parquet")
    upload(tmp_path / "x.parquet", f"{bucket}/repo/data/test-00000-of-00001.parquet")
    with pa.ipc.new_stream(tmp_path / "x.arrow", table.schema) as writer:
        writer.write_table(table)
    upload(tmp_path / "x.arrow", f"{bucket}/saved/data-00000-of-00001.arrow")
    (epath.Path(bucket) / "saved" / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": "data-00000-of-00001.arrow"}]}))

    def records(path, split="train"):
        sources = [open_source(f) for f in expand_paths(path, split)]
        return [str(s.path) for s in sources], [s[i][0] for s in sources for i in range(len(s))]

    assert records(f"{bucket}/src/*/*.jsonl") == (
        [f"{bucket}/src/a/part-0.jsonl", f"{bucket}/src/b/part-1.jsonl"], CHATS[:10] * 2)
    assert records(f"{bucket}/repo") == ([f"{bucket}/repo/data/train-00000-of-00001.parquet"], CHATS)
    assert records(f"{bucket}/saved")[1] == CHATS
    source = open_source(epath.Path(f"{bucket}/src/a/part-0.jsonl"))
    assert [source[i] for i in (7, 2)] == [(CHATS[7], f"{bucket}/src/a/part-0.jsonl:8"),
                                           (CHATS[2], f"{bucket}/src/a/part-0.jsonl:3")]
    with pytest.raises(UserError, match=r"data.path: 'gs://bkt/src/\*.parquet' matches no file"):
        expand_paths(f"{bucket}/src/*.parquet")


def _train(capsys, run_dir, model, data, steps) -> str:
    status = main(["train", *FAST, f"run_dir={run_dir}", f"model.path={model}", f"data.path={data}",
                   f"data.eval_path={data}", f"steps={steps}", "checkpoint.every=2", "checkpoint.async_save=false",
                   "data.batch_size=8", "eval.every=2", "optim.lr=1e-2"])
    out, err = capsys.readouterr()
    assert status == 0, err
    return out


@pytest.mark.slow
def test_a_run_in_a_bucket_trains_resumes_and_exports_byte_for_byte_like_a_local_run(bucket, tmp_path, capsys):
    model = write_model_dir(tmp_path / "model")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    upload(model, f"{bucket}/model")
    upload(data, f"{bucket}/data/chats.jsonl")
    runs = {"local": (str(tmp_path / "run"), str(model), str(data)),
            "bucket": (f"{bucket}/run", f"{bucket}/model", f"{bucket}/data/chats.jsonl")}
    for run_dir, model_path, data_path in runs.values():
        _train(capsys, run_dir, model_path, data_path, steps=4)
        resumed = _train(capsys, run_dir, model_path, data_path, steps=6)
        assert f"resumed from {run_dir}/checkpoints/4" in resumed
        status, err = cli(capsys, "export", run_dir, f"{run_dir}-export")
        assert status == 0, err
    local, remote = (epath.Path(runs[k][0]) for k in ("local", "bucket"))
    metrics = {k: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
               for k, d in (("local", local), ("bucket", remote))}
    assert [r["step"] for r in metrics["bucket"] if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "eval_loss", "eval_exact_match"):
        assert ([r[key] for r in metrics["bucket"] if key in r] == [r[key] for r in metrics["local"] if key in r]
                and any(key in r for r in metrics["local"])), key
    for name in ("eval/step_2.jsonl", "eval/step_6.jsonl", "config.yaml"):
        expected = (local / name).read_text()
        assert (remote / name).read_text() == (expected.replace(runs["local"][0], runs["bucket"][0])
                                               .replace(runs["local"][1], runs["bucket"][1])
                                               .replace(runs["local"][2], runs["bucket"][2]))
    assert (remote / "loss.png").is_file() and list((remote / "tensorboard").iterdir())
    exported = {k: epath.Path(f"{runs[k][0]}-export") for k in runs}
    assert sorted(p.name for p in exported["bucket"].iterdir()) == sorted(p.name for p in exported["local"].iterdir())
    for name in ("model.safetensors", "config.json"):
        assert (exported["bucket"] / name).read_bytes() == (exported["local"] / name).read_bytes()
    assert np.isfinite([r["loss"] for r in metrics["bucket"] if "loss" in r]).all()


def test_a_missing_file_in_a_bucket_is_one_line_naming_it(bucket, tmp_path, capsys):
    assert_one_line(*cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run'}", f"data.path={bucket}/none.jsonl"),
                    f"data.path: '{bucket}/none.jsonl' is not a file")
    assert_one_line(*cli(capsys, "train", *FAST, f"run_dir={tmp_path / 'run'}", f"model.path={bucket}/nomodel"),
                    f"model.path='{bucket}/nomodel': no config.json in that directory")


def test_the_run_lock_in_a_bucket_is_a_conditional_create(bucket, monkeypatch):
    """The store refuses the second create: a lock object written by another run stays as it was even when
    a look beforehand saw none (two runs starting together), and this run is refused naming it."""
    run = f"{bucket}/locked-run"
    other = json.dumps({"host": "elsewhere", "pid": 1, "since": 0.0})
    epath.Path(run, ".lock").write_text(other)
    lock = RunLock(run)
    with monkeypatch.context() as race:  # the other run's lock appears just after this run looked
        race.setattr(type(lock.path), "exists", lambda self: False)
        assert lock._create(json.dumps({"host": "here", "pid": 2})) is False  # the 412 of ifGenerationMatch=0
    assert epath.Path(run, ".lock").read_text() == other
    with pytest.raises(RunDirInUse, match=r"is in use by pid 1 on host elsewhere"):
        lock.acquire()
    free = RunLock(f"{bucket}/free-run").acquire()
    assert json.loads(epath.Path(bucket, "free-run", ".lock").read_text())["pid"] == os.getpid()
    free.release()
    assert not epath.Path(bucket, "free-run", ".lock").exists()
