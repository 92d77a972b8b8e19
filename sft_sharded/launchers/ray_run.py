"""One training process per host as Ray actors, restarted as a group when a host goes away.

    launch/ray_launch.py --hosts 2 --devices-per-host 4 -- train run_dir=runs/r1 mesh.slices=2 ...

Each actor starts `python -m sft_sharded.cli ...` on its host with the explicit cluster environment
(`distributed.py`: coordinator on the first actor's node, process id = actor index), so the run is the same
program as under any other launcher; process 0's output is streamed here, every process's goes to
`<log-dir>/attempt_A/process_I.log` on its own host. The child dies with its actor (PR_SET_PDEATHSIG): a
killed actor leaves no orphan holding the accelerator.

When an actor dies (a preempted host) or a process fails for any reason but a user's mistake, every actor
is stopped and a new group starts, up to `--max-restarts` times; the run resumes from its last checkpoint in
the run directory, with the same data position (which must therefore be storage every host sees). A user's
mistake (the CLI's exit status 2: a bad key, a missing file) fails once, with its one line. On TPUs the
actors are placed one per host of whole slices by Ray's TPU slice placement groups.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import ray

from sft_sharded.launchers.common import USER_ERROR_EXIT, megascale_env

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends it SIGKILL when the actor's process ends."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@ray.remote(max_restarts=0, max_concurrency=2)
class Host:
    """One host's training process."""

    def where(self) -> tuple[str, int]:
        """(this node's address, this actor's pid)."""
        return ray.util.get_node_ip_address(), os.getpid()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, argv: list[str], env: dict[str, str], log_file: str, stream: bool) -> tuple[int, list[str]]:
        """Run the CLI to its end: (exit status, its last lines)."""
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        tail: deque[str] = deque(maxlen=20)
        with open(log_file, "w") as log:
            child = subprocess.Popen([sys.executable, "-m", "sft_sharded.cli", *argv], env={**os.environ, **env},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=_die_with_parent)
            for line in child.stdout:
                log.write(line)
                tail.append(line.rstrip("\n"))
                if stream:
                    print(line, end="", flush=True)
            return child.wait(), list(tail)


def _actor_options(index: int, args, placement) -> dict:
    options = {"num_cpus": args.cpus_per_host}
    if args.tpu_chips_per_host:
        options["resources"] = {"TPU": args.tpu_chips_per_host}
    if placement is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement.placement_group, placement_group_bundle_index=index)
    return options


def _attempt(args, train_args: list[str], attempt: int, placement, say) -> tuple[str, int, list[str]]:
    """One group of actors from start to end: ("done" | "user_error" | "failed", process, its last lines)."""
    actors = [Host.options(**_actor_options(i, args, placement)).remote() for i in range(args.hosts)]
    try:
        places = ray.get([a.where.remote() for a in actors])
        for i, (node, pid) in enumerate(places):
            say(f"attempt {attempt}: process {i} runs in actor pid {pid} on node {node}")
        coordinator = f"{places[0][0]}:{ray.get(actors[0].free_port.remote())}"
        extra = [f"simulate_devices={args.devices_per_host}"] if args.devices_per_host else []
        runs = {}
        for i, actor in enumerate(actors):
            env = {"SFT_COORDINATOR": coordinator, "SFT_NUM_PROCESSES": str(args.hosts), "SFT_PROCESS_ID": str(i),
                   **megascale_env(places[0][0], args.slices, i // (args.hosts // args.slices))}
            if args.devices_per_host:
                env["JAX_PLATFORMS"] = "cpu"
            log = str(Path(args.log_dir).absolute() / f"attempt_{attempt}" / f"process_{i}.log")
            runs[actor.run.remote([*train_args, *extra], env, log, i == 0)] = i
        pending = list(runs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            index = runs[ready[0]]
            try:
                status, tail = ray.get(ready[0])
            except ray.exceptions.RayActorError as err:
                return "failed", index, [f"its actor died ({type(err).__name__})"]
            if status == USER_ERROR_EXIT:
                return "user_error", index, tail
            if status != 0:
                return "failed", index, [f"it exited with status {status}", *tail[-5:]]
        return "done", 0, []
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _placement(args):
    """Whole TPU slices, one bundle per host (Ray's TPU slice helpers), or None off TPUs."""
    if not args.tpu_topology:
        return None
    from ray.util.tpu import slice_placement_group

    gen, topology = args.tpu_topology.split(":")
    group = slice_placement_group(topology, gen, num_slices=args.slices)
    ray.get(group.placement_group.ready(), timeout=args.placement_timeout)
    if group.num_bundles != args.hosts:
        raise SystemExit(f"ray_launch: error: {args.slices} slice(s) of {args.tpu_topology} have "
                         f"{group.num_bundles} hosts, not --hosts {args.hosts}")
    return group


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="ray_launch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, required=True, help="processes (one per host), all slices together")
    parser.add_argument("--devices-per-host", type=int, default=0, help="simulated CPU devices per process")
    parser.add_argument("--address", default=None, help="a Ray cluster (default: RAY_ADDRESS, else a new local one)")
    parser.add_argument("--max-restarts", type=int, default=3)
    parser.add_argument("--cpus-per-host", type=float, default=1)
    parser.add_argument("--tpu-chips-per-host", type=int, default=0, help="Ray's TPU resource per actor")
    parser.add_argument("--tpu-topology", default=None, help="e.g. v5p:2x2x2: reserve whole slices of it")
    parser.add_argument("--slices", type=int, default=1,
                        help="TPU slices (the multi-slice runtime's MEGASCALE_* variables; with --tpu-topology, "
                             "whole slices reserved)")
    parser.add_argument("--placement-timeout", type=float, default=600)
    parser.add_argument("--log-dir", default=f"logs/ray-{time.strftime('%Y%m%d-%H%M%S')}")
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    train_args = argv[split + 1:]
    if not train_args or train_args[0] != "train":
        parser.error("after --, give the run's command: train KEY=VALUE ...")
    if args.hosts < 1 or args.max_restarts < 0 or args.slices < 1 or args.hosts % args.slices:
        parser.error("--hosts must be >= 1 and a multiple of --slices, and --max-restarts >= 0")
    return args, train_args


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse(list(sys.argv[1:] if argv is None else argv))

    def say(line: str) -> None:
        print(f"ray_launch: {line}", file=sys.stderr, flush=True)

    ray.init(address=args.address, log_to_driver=True, configure_logging=False)
    try:
        placement = _placement(args)
        for attempt in range(args.max_restarts + 1):
            outcome, index, tail = _attempt(args, train_args, attempt, placement, say)
            if outcome == "done":
                say(f"finished after {attempt} restart{'s' * (attempt != 1)}")
                return 0
            if outcome == "user_error":
                print(tail[-1] if tail else f"process {index} exited with status {USER_ERROR_EXIT}", file=sys.stderr)
                return USER_ERROR_EXIT
            say(f"attempt {attempt}: process {index} failed: {'; '.join(tail[:1])}")
            if attempt < args.max_restarts:
                say(f"restarting the group ({attempt + 1} of at most {args.max_restarts}); the run resumes from "
                    "its last checkpoint")
        say(f"giving up after {args.max_restarts} restarts (logs: {args.log_dir})")
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # A driver whose cluster is busy or going away can wait in shutdown for good: bounded, the verdict
        # above is already out (launch/ray_launch.py then exits without Ray's exit handlers).
        stopper = threading.Thread(target=ray.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout=30)
