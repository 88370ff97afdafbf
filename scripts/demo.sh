#!/usr/bin/env bash
# Install ngsgd_mpi into .venv and run the demo: 2 MPI ranks train a p-norm DNN with
# online NG-SGD on the embedded synthetic-speech corpus (a few minutes on 2 cores).
#   bash scripts/demo.sh [extra ngsgd-train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[mpi]'
[ -f demo_data/valid.h5 ] || .venv/bin/ngsgd-prepare demo --out demo_data --num-partitions 2
# a rerun starts over (the earlier demo run is replaced) unless it is asked to --resume
case " $* " in *" --resume"*) fresh=() ;; *) fresh=(--overwrite) ;; esac
exec .venv/bin/mpiexec -n 2 .venv/bin/ngsgd-train --config configs/quickstart.yaml "${fresh[@]}" "$@"
