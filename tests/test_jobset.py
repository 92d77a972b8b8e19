"""The GKE JobSet manifest: strict validation against the JobSet CRD's schema (kubernetes-sigs/jobset, read
from ../shared/k8s/) and Kubernetes' own schemas (kubernetes-validate), the environment each pod gets, the
xpk line, and the refusals."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from optional import optional

from sft_sharded.launchers.jobset import main, manifest, xpk_command
from sft_sharded.parallel.distributed import cluster_kind, explicit_cluster
from sft_sharded.topology import slice_hosts

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT.parent / "shared" / "k8s" / "jobset.x-k8s.io_jobsets.yaml"
TRAIN = ["train", "mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=1", "mesh.slices=2", "steps=100"]


def strict(schema):
    """The schema with every object that declares its properties closed to others: the API server drops a
    field its schema does not declare, which a plain validation of a CRD schema would let through."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
                "x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def jobset_validator():
    jsonschema = optional("jsonschema")
    if not CRD.is_file():
        pytest.skip(f"the JobSet CRD is read from {CRD}, which is absent here (../shared is not beside the checkout)")
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2")
    schema = strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def errors(validator, document):
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("topology, slices, hosts, chips, grid", [
    ("v5p-64", 2, 8, 4, "2x4x4"), ("v5p-16", 1, 2, 4, "2x2x2"), ("v6e-256", 4, 64, 4, "16x16"),
    ("v5e-8", 2, 1, 8, "2x4"), ("v5p:2x2x1", 2, 1, 4, "2x2x1"),
])
def test_manifests_validate_strictly_against_the_jobset_crd_and_kubernetes(jobset_validator, topology, slices,
                                                                          hosts, chips, grid):
    kubernetes_validate = optional("kubernetes_validate")
    doc = manifest("run1", topology, slices, "us-docker.pkg.dev/p/r/sft:1", "gs://bucket/run1", TRAIN, 5)
    assert errors(jobset_validator, doc) == []
    job = doc["spec"]["replicatedJobs"][0]
    assert job["replicas"] == slices and doc["spec"]["failurePolicy"]["maxRestarts"] == 5
    pod = job["template"]["spec"]["template"]["spec"]
    assert job["template"]["spec"]["completions"] == hosts == job["template"]["spec"]["parallelism"]
    assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == chips
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == grid
    assert doc["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"
    # The Job each replica stamps out, and its pods, against Kubernetes' own schemas (strict: no unknown field).
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "run1-slice-0"},
                                  **{"spec": job["template"]["spec"]}}, version, strict=True)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "run1-slice-0-0"},
                                  "spec": pod}, version, strict=True)


def test_the_validators_catch_what_the_api_server_would_drop_or_refuse(jobset_validator):
    kubernetes_validate = optional("kubernetes_validate")
    doc = manifest("run1", "v5p-64", 2, "img", "gs://b/r", TRAIN)
    unknown = copy.deepcopy(doc)
    unknown["spec"]["replicatedJobs"][0]["replica"] = 2  # a misspelt field: dropped by the API server
    assert any("replica" in e for e in errors(jobset_validator, unknown))
    bad_action = copy.deepcopy(doc)
    bad_action["spec"]["failurePolicy"]["rules"][0]["action"] = "Restart"
    assert errors(jobset_validator, bad_action)
    pod = copy.deepcopy(doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"])
    pod["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod},
                                     kubernetes_validate.latest_version(), strict=True)


def pod_environment(doc, slice_id, host):
    """What Kubernetes gives the pod of `host` in slice `slice_id`: JobSet's annotations through fieldRef,
    then `$(NAME)` expanded from the variables defined before it."""
    name = doc["metadata"]["name"]
    job = doc["spec"]["replicatedJobs"][0]["name"]
    coordinator = doc["spec"]["coordinator"]
    annotations = {
        "jobset.sigs.k8s.io/coordinator": f"{name}-{coordinator['replicatedJob']}-{coordinator['jobIndex']}-"
                                          f"{coordinator['podIndex']}.{name}",
        "jobset.sigs.k8s.io/job-index": str(slice_id),
        "batch.kubernetes.io/job-completion-index": str(host),
        "jobset.sigs.k8s.io/replicatedjob-name": job,
    }
    env = {}
    for var in doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "valueFrom" in var:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = annotations[re.fullmatch(r"metadata\.annotations\['(.+)'\]", path).group(1)]
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
    return env


def test_every_pod_computes_its_coordinator_process_id_count_and_slice():
    doc = manifest("run1", "v5p-64", 2, "img", "gs://b/r", TRAIN)  # 2 slices x 8 hosts
    seen = []
    for slice_id in range(2):
        for host in range(8):
            env = pod_environment(doc, slice_id, host)
            assert cluster_kind(env) == "explicit"
            cluster = explicit_cluster(env)
            assert cluster["coordinator"] == "run1-slice-0-0.run1:8476"
            assert cluster["num_processes"] == 16 and cluster["slice_id"] == slice_id
            assert env["MEGASCALE_SLICE_ID"] == str(slice_id) and env["MEGASCALE_NUM_SLICES"] == "2"
            assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "run1-slice-0-0.run1"
            seen.append(cluster["process_id"])
    assert seen == list(range(16))  # slice-major: a slice's hosts are consecutive processes
    one = manifest("run1", "v5p-16", 1, "img", "gs://b/r", ["train"])
    assert "MEGASCALE_NUM_SLICES" not in pod_environment(one, 0, 1)  # one slice: no DCN runtime


def test_slice_hosts_as_gke_provisions_them():
    assert slice_hosts("v5p", "4x4x4") == (16, 4) and slice_hosts("v5e", "2x4") == (1, 8)
    assert slice_hosts("v6e", "4x4") == (4, 4) and slice_hosts("v5e", "1x1") == (1, 1)


def test_xpk_line_and_the_refusals(capsys):
    line = xpk_command("run1", "c1", "v5e-16", 2, "img", "gs://b/r", TRAIN, 4)
    assert line.startswith("xpk workload create --cluster c1 --workload run1 --tpu-type v5litepod-16 --num-slices 2 "
                           "--docker-image img --max-restarts 4 --command ")
    assert "'python3 -m sft_sharded.cli train mesh.data=2" in line and "run_dir=gs://b/r'" in line
    base = ["--name", "r", "--topology", "v5p-64", "--slices", "2", "--image", "i", "--run-dir", "gs://b/r", "--"]
    for args, message in [
        ([*base, *TRAIN, "optim.lrr=1"], "optim.lrr"),
        ([*base, "train", "mesh.data=2"], "--slices 2 but the run's mesh.slices=1: add mesh.slices=2"),
        ([*base, *TRAIN, "run_dir=/x"], "give the run directory as --run-dir"),
        ([*base[:-1], "--xpk", "--", *TRAIN], "--xpk needs --cluster"),
        (["--name", "r", "--topology", "v5p:2x2x1", "--slices", "2", "--image", "i", "--run-dir", "gs://b/r",
          "--xpk", "--cluster", "c", "--", *TRAIN], "xpk takes an accelerator type"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("gke_jobset: error: ") and message in err[0], err


def test_the_script_prints_yaml_that_loads():
    out = subprocess.run([sys.executable, str(ROOT / "launch/gke_jobset.py"), "--name", "run1", "--topology",
                          "v5p-16", "--image", "img", "--run-dir", "gs://b/r", "--", "train"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["kind"] == "JobSet"
