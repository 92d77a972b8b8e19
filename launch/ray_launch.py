#!/usr/bin/env python3
"""Run one training process per host as Ray actors, restarting the group when a host goes away:
    launch/ray_launch.py --hosts 2 --devices-per-host 4 [--address ADDR] [--max-restarts 3] -- train run_dir=... ...
See sft_sharded/launchers/ray_run.py and launch/README.md."""
import os
import sys

from sft_sharded.launchers.ray_run import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # Ray's exit handlers can wait on a cluster that is going away; main has said everything
