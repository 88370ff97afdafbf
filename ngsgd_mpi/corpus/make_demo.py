"""Rebuild ``ngsgd_mpi/demo_corpus.npz``: ``python -m ngsgd_mpi.corpus.make_demo [OUT.npz]``.

Runs the recipe with phone labels and light noise (10 train + 2 test
speakers, 0.125 h by default) in a temporary directory and packs it with
:func:`ngsgd_mpi.corpus.demo.pack_corpus`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from ngsgd_mpi.corpus.demo import DEMO_CORPUS_PATH, pack_corpus
from ngsgd_mpi.corpus.make_corpus import CorpusConfig, make_corpus


def build_demo_corpus(out_path: str, hours: float = 0.125, num_speakers: int = 10,
                      test_speakers: int = 2, seed: int = 0, jobs: int = 1) -> dict:
    """Run the recipe (phone labels, light noise) and pack it as the demo ``.npz``; returns shapes."""
    work = tempfile.mkdtemp(prefix="ngsgd-demo-")
    try:
        config = CorpusConfig(hours=hours, noise="light", labels="phone", num_speakers=num_speakers,
                              test_speakers=test_speakers, seed=seed, jobs=jobs)
        make_corpus(work, config)
        return pack_corpus(work, out_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild the demo corpus .npz with the recipe.")
    parser.add_argument("out_path", nargs="?", default=str(DEMO_CORPUS_PATH))
    parser.add_argument("--hours", type=float, default=0.125)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shapes = build_demo_corpus(args.out_path, hours=args.hours, seed=args.seed, jobs=args.jobs)
    print({k: v for k, v in shapes.items()})
    print(f"{args.out_path}: {os.path.getsize(args.out_path) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
