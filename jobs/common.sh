# Shared by the jobs/*.sbatch scripts (sourced, never submitted itself).
#
# ngsgd_setup            activate the Python environment, set thread counts and MPICH's
#                        Allreduce composition (see below), print a header
# ngsgd_clean_shm        remove stale MPICH shared memory on every node of the job (see
#                        clean_stale_shm.sh: without it a requeued job can hang in MPI_Init)
# ngsgd_split STRING     its words, split at whitespace, in the array NGSGD_WORDS
# ngsgd_run CMD...       run CMD in the background and wait for it; SIGUSR1/SIGTERM to this
#                        batch shell are passed on to CMD as SIGUSR1; returns CMD's exit code
# ngsgd_train_exit RC    end a training job: 0 -> 0; 75 (stopped, checkpoint written) ->
#                        `scontrol requeue` and 0, unless the job is already ending (a
#                        cancelled job stays cancelled); anything else -> passed through
#
# Why SIGUSR1 is what gets forwarded: `#SBATCH --signal=B:USR1@300` signals only this
# shell, so it must reach the ranks through the launcher.  srun passes SIGUSR1 on to every
# task but turns SIGTERM into "cancel the step" (the tasks are killed, no checkpoint);
# MPICH's hydra mpiexec passes both on; Open MPI's mpirun passes SIGUSR1 on.  ngsgd-train
# treats SIGUSR1 and SIGTERM alike, so SIGUSR1 works with all three.

ngsgd_setup() {
    if [ -z "${VENV+set}" ]; then                  # default: the repository's .venv, if any
        VENV=""
        [ -f "$REPO/.venv/bin/activate" ] && VENV="$REPO/.venv"
    fi
    if [ -n "$VENV" ]; then
        # shellcheck disable=SC1091
        source "$VENV/bin/activate" || { echo "jobs: cannot activate VENV=$VENV" >&2; exit 2; }
    fi
    # One BLAS/OpenMP thread pool per rank, as big as the CPUs Slurm gave each task.
    export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}"
    export OPENBLAS_NUM_THREADS="$OMP_NUM_THREADS" MKL_NUM_THREADS="$OMP_NUM_THREADS"
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ] && [ -z "${NGSGD_THREADS_PER_RANK:-}" ]; then
        export NGSGD_THREADS_PER_RANK="$SLURM_CPUS_PER_TASK"
    fi
    # MPICH's default Allreduce over several nodes first sums within each node, so the order
    # of the float sums depends on how the ranks are spread over the nodes: a requeued job
    # that lands 1+2 instead of 2+1 would resume to a final model that differs in the last
    # bits. "2" is one flat Allreduce over all ranks, the same sums wherever they run
    # (tests/test_multihost.py). It may be slower with many ranks per node, but there is one
    # average per samples_per_average (0.01% of the run time on one node, docs/benchmarks.md).
    # Other MPI libraries ignore the variable.
    export MPIR_CVAR_ALLREDUCE_COMPOSITION="${MPIR_CVAR_ALLREDUCE_COMPOSITION:-2}"
    echo "== $(date '+%F %T') job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}), restart" \
         "${SLURM_RESTART_COUNT:-0}, nodes ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-1} task(s) x" \
         "$OMP_NUM_THREADS thread(s); python $(command -v python3 || echo none)"
}

ngsgd_clean_shm() {
    srun --ntasks="${SLURM_NNODES:-1}" --ntasks-per-node=1 --cpus-per-task=1 \
        "$REPO/jobs/clean_stale_shm.sh"
}

ngsgd_split() {
    # `read -a`, not NGSGD_WORDS=($1): no glob expansion of words like "data/*.h5"
    # shellcheck disable=SC2034  # used by the scripts that source this file
    read -r -a NGSGD_WORDS <<< "$1"
}

ngsgd_forward_stop() {
    echo "== $(date '+%F %T') batch shell got SIG$1: asking the ranks to checkpoint and stop" \
         "(SIGUSR1 to the launcher, pid $NGSGD_CHILD)"
    [ -n "$NGSGD_CHILD" ] && kill -USR1 "$NGSGD_CHILD" 2>/dev/null
}

ngsgd_run() {
    NGSGD_CHILD=""
    trap 'ngsgd_forward_stop USR1' USR1
    trap 'ngsgd_forward_stop TERM' TERM
    "$@" &
    NGSGD_CHILD=$!
    # `wait` returns early whenever a trapped signal arrives: wait again until CMD is gone,
    # then once more for its exit status (bash remembers it).
    while kill -0 "$NGSGD_CHILD" 2>/dev/null; do
        wait "$NGSGD_CHILD"
    done
    wait "$NGSGD_CHILD"
    local rc=$?
    trap - USR1 TERM
    return "$rc"
}

ngsgd_train_exit() {
    local rc=$1
    case "$rc" in
        0)
            echo "== $(date '+%F %T') training finished"
            exit 0 ;;
        75)
            # Requeue only a job that is still RUNNING: one that Slurm or the user is ending
            # (scancel, time limit, `scontrol requeue`, preemption) shows COMPLETING.
            local state
            state=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*')
            state=${state#JobState=}
            if [ -n "$state" ] && [ "$state" != RUNNING ]; then
                echo "== $(date '+%F %T') stopped with a checkpoint (exit 75) while the job is" \
                     "$state (cancelled, timed out, or requeued by Slurm): not requeueing it"
                exit 75
            fi
            if [ "${SLURM_RESTART_COUNT:-0}" -ge "${MAX_REQUEUES:-50}" ]; then
                echo "== stopped with a checkpoint; not requeueing (restart ${SLURM_RESTART_COUNT}" \
                     ">= MAX_REQUEUES=${MAX_REQUEUES:-50}); resubmit to continue" >&2
                exit 75
            fi
            echo "== $(date '+%F %T') stopped with a checkpoint (exit 75): requeueing job $SLURM_JOB_ID"
            if scontrol requeue "$SLURM_JOB_ID"; then
                exit 0
            fi
            echo "== scontrol requeue failed; resubmit this job to continue (it resumes)" >&2
            exit 75 ;;
        *)
            echo "== $(date '+%F %T') training failed with exit code $rc" >&2
            exit "$rc" ;;
    esac
}
