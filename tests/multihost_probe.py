"""Run under mpiexec by test_multihost.py: what each rank's host-dependent setup decided.

    python multihost_probe.py OUT_DIR

Writes OUT_DIR/rank<r>.json with the rank's hostname, MPI's processor name, the node-local
rank count (``Dist.local_size``), the BLAS threads ``trainer.set_threads`` chose with
``threads_per_rank: 0`` (automatic), and ``CUDA_VISIBLE_DEVICES`` as this process sees it
(launched through ``jobs/one_gpu_per_rank.sh``, that is the GPU it was left).
"""

import json
import os
import socket
import sys
from types import SimpleNamespace

from ngsgd_mpi import distributed, trainer


def main(out_dir):
    dist = distributed.init()
    report = {"rank": dist.rank, "size": dist.size, "hostname": socket.gethostname(),
              "processor_name": dist.MPI.Get_processor_name(), "local_size": dist.local_size(),
              "threads": trainer.set_threads(SimpleNamespace(threads_per_rank=0), dist),
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    path = os.path.join(out_dir, f"rank{dist.rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
