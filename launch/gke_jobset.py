#!/usr/bin/env python3
"""Print a GKE JobSet manifest (or with --xpk, the `xpk workload create` command) for a run over TPU slices:
    launch/gke_jobset.py --name run1 --topology v5p-64 --slices 2 --image IMAGE --run-dir gs://BUCKET/run1 \
        -- train mesh.data=2 mesh.fsdp=-1 mesh.slices=2 ...
    ... | kubectl apply -f -
See sft_sharded/launchers/jobset.py and launch/README.md."""
import sys

from sft_sharded.launchers.jobset import main

if __name__ == "__main__":
    sys.exit(main())
