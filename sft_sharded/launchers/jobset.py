"""A GKE JobSet manifest (or the equivalent `xpk workload create` command) for a run over TPU slices.

    launch/gke_jobset.py --name run1 --topology v5p-64 --slices 2 --image IMAGE --run-dir gs://b/run1 \
        -- train model.path=gs://b/llama mesh.data=2 mesh.fsdp=-1 mesh.slices=2

One replicated job whose `replicas` is the slice count (as xpk and JobSet's own examples do), each an
indexed Job of one pod per host with the slice's TPU node selectors and chips; a node pool per slice
(exclusive placement). Every pod learns its place from JobSet's annotations: the coordinator pod's address
(`spec.coordinator`), its slice (the job index) and its host (the completion index); `distributed.py`
turns them into jax.distributed's process id, and the multi-slice runtime reads the MEGASCALE_* variables.

Restarts: a preempted pod (condition DisruptionTarget) fails its Job, and the JobSet restarts whole without
spending `--max-restarts`; any other failure restarts it within that budget; the CLI's exit status 2 (a
user's mistake: a bad key, a missing file) fails the JobSet at once. The run directory must outlive the
pods (a bucket, or a mount every pod shares): a restarted run resumes from its last checkpoint there.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

import yaml

from sft_sharded.config import load_config
from sft_sharded.errors import UserError
from sft_sharded.launchers.common import MEGASCALE_PORT, USER_ERROR_EXIT, megascale_env
from sft_sharded.topology import parse_topology, slice_hosts

API_VERSION = "jobset.x-k8s.io/v1alpha2"
JOB = "slice"  # the replicated job: one Job per slice
CONTAINER = "train"
COORDINATOR_PORT = 8476  # jax.distributed's coordinator (on the first pod of the first slice)
# GKE's node label for each TPU generation (cloud.google.com/gke-tpu-accelerator).
ACCELERATOR_LABELS = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice", "v5p": "tpu-v5p-slice",
                      "v6e": "tpu-v6e-slice"}
# xpk's --tpu-type prefix for each generation (it counts chips for v5e/v6e, TensorCores for v4/v5p).
XPK_PREFIX = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}


def _pod_env(slices: int, hosts: int) -> list[dict[str, Any]]:
    """The environment of every pod; Kubernetes expands `$(NAME)` from variables defined before it."""
    def annotation(name: str, key: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{key}']"}}}

    env = [annotation("JOBSET_COORDINATOR", "jobset.sigs.k8s.io/coordinator"),
           annotation("SFT_SLICE_ID", "jobset.sigs.k8s.io/job-index"),
           annotation("SFT_HOST_INDEX", "batch.kubernetes.io/job-completion-index"),
           {"name": "SFT_HOSTS_PER_SLICE", "value": str(hosts)},
           {"name": "SFT_NUM_PROCESSES", "value": str(slices * hosts)},
           {"name": "SFT_COORDINATOR", "value": f"$(JOBSET_COORDINATOR):{COORDINATOR_PORT}"}]
    megascale = megascale_env("$(JOBSET_COORDINATOR)", slices, "$(SFT_SLICE_ID)")
    env += [{"name": name, "value": value} for name, value in megascale.items()]
    return env


def train_command(train_args: list[str], run_dir: str) -> list[str]:
    return ["python3", "-m", "sft_sharded.cli", *train_args, f"run_dir={run_dir}"]


def manifest(name: str, topology: str, slices: int, image: str, run_dir: str, train_args: list[str],
             max_restarts: int = 3) -> dict[str, Any]:
    gen, grid = parse_topology(topology)
    hosts, chips = slice_hosts(gen, grid)
    pod_spec = {
        "restartPolicy": "Never",
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": ACCELERATOR_LABELS[gen],
                         "cloud.google.com/gke-tpu-topology": grid},
        # The TPU VMs' own network: the chips' DCN transport and the coordinator bind on the host.
        "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
        "terminationGracePeriodSeconds": 60,  # SIGTERM first: the loop saves at the next step boundary
        "containers": [{
            "name": CONTAINER, "image": image, "command": train_command(train_args, run_dir),
            "ports": [{"containerPort": COORDINATOR_PORT}, {"containerPort": MEGASCALE_PORT},
                      {"containerPort": 8471}],  # 8471: the TPU runtime
            "env": _pod_env(slices, hosts),
            "resources": {"limits": {"google.com/tpu": chips}},
        }],
    }
    job_spec = {
        "parallelism": hosts, "completions": hosts, "completionMode": "Indexed", "backoffLimit": 0,
        # Which failures end the Job and how the JobSet reads them (spec.failurePolicy.rules below).
        "podFailurePolicy": {"rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": [USER_ERROR_EXIT]}},
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"spec": pod_spec},
    }
    return {
        "apiVersion": API_VERSION, "kind": "JobSet",
        "metadata": {"name": name,
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "coordinator": {"replicatedJob": JOB, "jobIndex": 0, "podIndex": 0},
            "network": {"enableDNSHostnames": True},
            "failurePolicy": {"maxRestarts": max_restarts, "restartStrategy": "Recreate", "rules": [
                {"name": "user-error", "action": "FailJobSet",
                 "onJobFailureMessagePatterns": ["failed with exit code 2 matching FailJob rule at index 0"]},
                {"name": "preemption", "action": "RestartJobSetAndIgnoreMaxRestarts",
                 "onJobFailureMessagePatterns": ["matching FailJob rule at index 1"]},
            ]},
            "replicatedJobs": [{"name": JOB, "replicas": slices, "template": {"spec": job_spec}}],
        },
    }


def xpk_command(name: str, cluster: str, topology: str, slices: int, image: str, run_dir: str,
                train_args: list[str], max_restarts: int = 3) -> str:
    """The `xpk workload create` line that makes the same JobSet (xpk writes its own manifest)."""
    gen, _ = parse_topology(topology)
    count = topology.split("-")[1] if "-" in topology else None
    if count is None:
        raise UserError(f"--topology {topology!r}: xpk takes an accelerator type such as v5p-64, not a chip grid")
    return shlex.join(["xpk", "workload", "create", "--cluster", cluster, "--workload", name,
                       "--tpu-type", f"{XPK_PREFIX[gen]}-{count}", "--num-slices", str(slices),
                       "--docker-image", image, "--max-restarts", str(max_restarts),
                       "--command", shlex.join(train_command(train_args, run_dir))])


def _check_train_args(train_args: list[str], slices: int) -> None:
    """The run's command and keys, checked here before anything is submitted."""
    if not train_args or train_args[0] != "train":
        got = shlex.join(train_args) or "nothing"
        raise UserError(f"after --, give the run's command: train KEY=VALUE ... (got {got})")
    if any(arg.startswith("run_dir=") for arg in train_args[1:]):
        raise UserError("give the run directory as --run-dir (every pod and every restart uses it), not run_dir=")
    config_file = [a for a in train_args[1:] if "=" not in a]
    cfg = load_config(config_file[0] if config_file else None, [a for a in train_args[1:] if "=" in a])
    if cfg.mesh.slices != slices:
        raise UserError(f"--slices {slices} but the run's mesh.slices={cfg.mesh.slices}: add mesh.slices={slices}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gke_jobset.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the JobSet's name (a DNS label)")
    parser.add_argument("--topology", required=True, help="one slice: e.g. v5p-64, v6e-256 or v5p:4x4x4")
    parser.add_argument("--slices", type=int, default=1)
    parser.add_argument("--image", required=True, help="a container image with sft_sharded[tpu] installed")
    parser.add_argument("--run-dir", required=True, help="gs://BUCKET/RUN (or a path every pod mounts)")
    parser.add_argument("--max-restarts", type=int, default=3, help="restarts after failures other than preemption")
    parser.add_argument("--xpk", action="store_true", help="print the `xpk workload create` command instead")
    parser.add_argument("--cluster", help="the GKE cluster (for --xpk)")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    train_args = argv[split + 1:]
    try:
        _check_train_args(train_args, args.slices)
        if args.xpk:
            if not args.cluster:
                raise UserError("--xpk needs --cluster CLUSTER")
            print(xpk_command(args.name, args.cluster, args.topology, args.slices, args.image, args.run_dir,
                              train_args, args.max_restarts))
        else:
            print(yaml.safe_dump(manifest(args.name, args.topology, args.slices, args.image, args.run_dir,
                                          train_args, args.max_restarts), sort_keys=False), end="")
    except (UserError, ValueError) as err:
        print(f"gke_jobset: error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0
