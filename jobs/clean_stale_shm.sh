#!/bin/bash
# Remove this user's stale MPICH shared-memory files on this node: /dev/shm/mpich_* that no
# running process has mapped.  The job scripts run it on every node before starting the ranks.
#
# Why: MPICH names its node-local segment after the PMI job name, which under srun is
# "JOBID.STEPID", and leaves it behind when the ranks are killed (SIGKILL, OOM, node trouble).
# A requeued job keeps its id and numbers its steps from 0 again, so its ranks open the stale
# segment and hang or fail in MPI_Init ("UCX ERROR failed to unpack address").  The files are
# mode 0600, so only this user's processes can map them, and those are all visible in /proc.
in_use=$(cat /proc/[0-9]*/maps 2>/dev/null | grep -o '/dev/shm/mpich_[^ ]*' | sort -u)
for f in /dev/shm/mpich_*; do
    [ -O "$f" ] || continue                       # no match, or another user's file
    grep -qxF "$f" <<< "$in_use" && continue       # mapped by a running process: in use
    rm -f "$f" && echo "clean_stale_shm: removed $f on $(hostname -s) (no process maps it)"
done
exit 0
