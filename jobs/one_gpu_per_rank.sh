#!/bin/bash
# Run a command so that it sees only one GPU: the one of its node-local rank.
#
#   one_gpu_per_rank.sh CMD...
#
# ngsgd-train (device: gpu) uses GPU 0 of what it sees.  When Slurm already gave each task
# its own GPU (srun --gpus-per-task=1) CUDA_VISIBLE_DEVICES has one entry and nothing
# changes; when every rank of a node sees all the node's GPUs (mpiexec, or --gres without
# per-task binding), rank r on the node keeps entry r mod (number of GPUs).  No GPUs
# listed: nothing changes (CPU runs).
# Node-local rank: MPICH hydra's MPI_LOCALRANKID, Open MPI's OMPI_COMM_WORLD_LOCAL_RANK,
# else srun's SLURM_LOCALID.
local_rank=${MPI_LOCALRANKID:-${OMPI_COMM_WORLD_LOCAL_RANK:-${SLURM_LOCALID:-0}}}
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
    if [ "${#gpus[@]}" -gt 1 ]; then
        export CUDA_VISIBLE_DEVICES="${gpus[local_rank % ${#gpus[@]}]}"
    fi
fi
exec "$@"
