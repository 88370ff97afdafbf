"""Small generated speech-like data sets for tests: utterances of label runs
(phone-like segments) whose frames are class means plus noise."""

import importlib.util
import os

import numpy as np

from ngsgd_mpi import data
from ngsgd_mpi.distributed import mpiexec  # noqa: F401 - the launcher the tests use

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "scripts")


def utterances(seed, num_utts, feat_dim=8, num_classes=6, noise=1.0, min_len=20, max_len=60):
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(1234).standard_normal((num_classes, feat_dim)) * 1.5
    out = []
    for u in range(num_utts):
        n = int(rng.integers(min_len, max_len + 1))
        labels = np.repeat(rng.integers(0, num_classes, n // 5 + 1), 5)[:n].astype(np.int32)
        feats = (means[labels] + noise * rng.standard_normal((n, feat_dim))).astype(np.float32)
        out.append((f"s{seed}u{u:04d}", feats, labels))
    return out


def write_dataset(root, num_partitions=2, utts_per_partition=30, valid_utts=20, feat_dim=8,
                  num_classes=6, seed=0):
    """root/train/train.K.h5 and root/valid.h5; returns (train_dir, valid_path)."""
    train = root / "train"
    train.mkdir(parents=True, exist_ok=True)
    dataset_id = data.new_dataset_id()             # one preparation: every partition shares it
    for k in range(num_partitions):
        data.write_partition(train / f"train.{k}.h5", utterances(seed * 100 + k, utts_per_partition,
                             feat_dim, num_classes), feat_dim, num_classes, partition_index=k,
                             num_partitions=num_partitions, dataset_id=dataset_id)
    valid = root / "valid.h5"
    data.write_partition(valid, utterances(seed * 100 + 99, valid_utts, feat_dim, num_classes),
                         feat_dim, num_classes, role="valid")
    return str(train), str(valid)




def run(cmd, timeout=180, **kwargs):
    """subprocess.run with one BLAS thread per process and a hard timeout (MPI jobs can hang)."""
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NGSGD_THREADS_PER_RANK="1")
    env.update(kwargs.pop("env", {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def crashed_copy(finished_run, out, keep):
    """Copy of a finished run as a crash after its ``keep``-th checkpoint would leave it:
    no final model, no later checkpoints.  Returns the checkpoints left."""
    import os
    import shutil

    from ngsgd_mpi import checkpoint

    shutil.copytree(finished_run, out)
    os.remove(os.path.join(out, "final.h5"))
    done = checkpoint.complete_checkpoints(out)
    for ckpt in done[keep:]:
        shutil.rmtree(ckpt.path)
    return done[:keep]


def load_script(name: str):
    """scripts/NAME.py as a module (its functions, without running it)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_corpus(root, num_classes=6):
    """A tiny ngsgd-make-corpus-like output: train/ (3 speakers) and test/ (1 speaker)."""
    from ngsgd_mpi.corpus import Utterance, write_kaldi_data_dir

    names = [f"c{k}" for k in range(num_classes)]
    for split, speakers, seed in (("train", ["s001", "s002", "s003"], 0), ("test", ["t001"], 9)):
        utts = []
        for s, spk in enumerate(speakers):
            for i, (_, feats, labels) in enumerate(utterances(seed + s, 20, num_classes=num_classes)):
                utts.append(Utterance(f"{spk}-{i:04d}", spk, "A", feats, labels))
        write_kaldi_data_dir(str(root / split), utts, names)
