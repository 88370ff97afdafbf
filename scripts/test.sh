#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine and run it.
#   bash scripts/test.sh [pytest args]
# System packages (espeak-ng for the corpus recipe, Slurm + munge for the jobs/ test) are
# installed with apt-get when running as root on Debian; Python packages go into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  pkgs="espeak-ng libespeak-ng1 slurm-wlm munge iproute2"
  missing=""
  for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[mpi,test]'

# One BLAS thread per process: tests start several MPI ranks on 2 cores.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
exec .venv/bin/python -m pytest "$@"
