#!/bin/bash
# Submit one training job per number of ranks N (the paper's job-count sweep), each into its
# own output directory.  Run it on a login node:
#
#   jobs/sweep.sh 1 2 4 8
#   CHAIN=1 RANKS_PER_NODE=4 SBATCH_ARGS="--gpus-per-task=1 --cpus-per-task=8" \
#       EXTRA_ARGS="--device gpu" CONFIG=configs/pnorm_paper.yaml jobs/sweep.sh 4 8 16 32
#
# Variables (defaults in brackets):
#   NS              [1 2 4 8]     the values of N (arguments, if given, replace it)
#   SCRIPT          [jobs/train_srun.sbatch]  the training job script (or jobs/train_mpiexec.sbatch)
#   CONFIG          [configs/quickstart.yaml]  training config; the data needs >= N partitions
#   OUT_ROOT        [runs/sweep]  job N trains into OUT_ROOT/nN (and logs to OUT_ROOT/nN.log)
#   EXTRA_ARGS      []            ngsgd-train options for every job (passed in the environment)
#   SBATCH_ARGS     []            more sbatch options for every job, split at whitespace
#   RANKS_PER_NODE  []            set: --nodes=ceil(N/RANKS_PER_NODE) --ntasks-per-node=min(N,
#                                 RANKS_PER_NODE); empty: only --ntasks=N (Slurm places them)
#   CHAIN           [0]           1: each job starts after the previous one ends
#                                 (--dependency=afterany:ID), so their timings do not compete
#   DRY_RUN         [0]           1: print the sbatch commands instead of running them
#
# Prints one line per job: N, job id, output directory.  Compare the runs afterwards from
# OUT_ROOT/n*/metrics.jsonl (frames_per_sec, valid_obj per period).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
SCRIPT=${SCRIPT:-$here/train_srun.sbatch}
CONFIG=${CONFIG:-configs/quickstart.yaml}
OUT_ROOT=${OUT_ROOT:-runs/sweep}
ns=("$@")
if [ "${#ns[@]}" = 0 ]; then
    read -r -a ns <<< "${NS:-1 2 4 8}"
fi
read -r -a sbatch_args <<< "${SBATCH_ARGS:-}"
export CONFIG EXTRA_ARGS="${EXTRA_ARGS:-}"      # the job scripts read these from the environment

previous=""
for n in "${ns[@]}"; do
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "sweep.sh: error: N must be a positive integer, got '$n'" >&2
        exit 2
    fi
    layout=(--ntasks="$n")
    if [ -n "${RANKS_PER_NODE:-}" ]; then
        per_node=$(( n < RANKS_PER_NODE ? n : RANKS_PER_NODE ))
        layout+=(--nodes=$(( (n + RANKS_PER_NODE - 1) / RANKS_PER_NODE )) --ntasks-per-node="$per_node")
    fi
    dependency=()
    [ "${CHAIN:-0}" = 1 ] && [ -n "$previous" ] && dependency=(--dependency="afterany:$previous")
    out="$OUT_ROOT/n$n"
    cmd=(sbatch --parsable --job-name="ngsgd-n$n" --output="$OUT_ROOT/n$n.log" "${layout[@]}"
         "${dependency[@]}" "${sbatch_args[@]}" --export="ALL,OUT_DIR=$out" "$SCRIPT")
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "${cmd[@]}"
        echo
        previous="DRYRUN_N$n"
        continue
    fi
    mkdir -p "$OUT_ROOT"
    previous=$("${cmd[@]}")
    previous=${previous%%;*}
    echo "N=$n job $previous out $out"
done
