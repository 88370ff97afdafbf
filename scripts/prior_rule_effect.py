"""The effect of the prior rule (priors.py, P1-P3) on held-out frames of two data sets.

* YesNo: the Kaldi recipe in ../shared/kaldi/yesno (data/train + exp/mono: 22 pdfs, 5 of them
  without training frames); 20 % of the utterances held out.
* Digits-like: the embedded demo corpus with its 40 classes folded onto 9 (label mod 9) and
  29 network outputs, so 20 of 29 classes never occur in training, as in the Digits tri1
  system of issue 10 (29 pdfs, 20 unseen); its test split held out.

For each, a small p-norm network is trained (one process), then on the held-out frames every
rule's log-likelihoods are compared: the share of frames whose best class has no training frames,
and frame accuracy of the best class against the alignment.  Prints a Markdown table.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python scripts/prior_rule_effect.py [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ngsgd_mpi import data, prepare, priors
from ngsgd_mpi.model import Model

ROOT = Path(__file__).resolve().parents[1]
YESNO = ROOT.parent / "shared" / "kaldi" / "yesno"
TRAIN_ARGS = ["--context=4", "--num-hidden-layers=2", "--pnorm-input-dim=200", "--pnorm-output-dim=20",
              "--optimizer=ng-online", "--minibatch-size=256", "--samples-per-average=4000",
              "--num-epochs=4", "--lr-initial=0.004", "--lr-final=0.0004", "--combine-last-k=0",
              "--threads-per-rank=1", "--seed=0"]


def prepare_yesno(work: Path) -> Path:
    out = work / "yesno"
    os.chdir(YESNO)                                  # Kaldi's scp paths are relative to the recipe
    prepare.prepare_kaldi(None, None, str(out), prepare.PrepareOptions(valid_fraction=0.2, dtype="float32"),
                          log=lambda s: None, data_dir="data/train", ali_dir="exp/mono")
    os.chdir(ROOT)
    return out


def prepare_digits_like(work: Path) -> Path:
    from ngsgd_mpi.corpus import load_demo_corpus  # noqa: PLC0415

    corpus = load_demo_corpus()
    npz = work / "digits_like.npz"
    feats = np.concatenate([corpus["train_feats"], corpus["test_feats"]]).astype(np.float32)
    labels = np.concatenate([corpus["train_labels"], corpus["test_labels"]]) % 9
    offsets = np.concatenate([corpus["train_utt_offsets"],
                              corpus["train_utt_offsets"][-1] + corpus["test_utt_offsets"][1:]])
    ids = np.concatenate([corpus["train_utt_ids"], corpus["test_utt_ids"]]).astype(str)
    np.savez(npz, feats=feats, labels=labels.astype(np.int32), utt_offsets=offsets, utt_ids=ids)
    valid_list = work / "digits_like.valid"
    valid_list.write_text("".join(f"{u}\n" for u in np.asarray(corpus["test_utt_ids"]).astype(str)))
    out = work / "digits_like"
    prepare.prepare_numpy([str(npz)], str(out), prepare.PrepareOptions(num_classes=29, dtype="float32",
                                                                       valid_utts=str(valid_list)),
                          log=lambda s: None)
    return out


def train(prepared: Path, work: Path) -> Model:
    out = work / f"run_{prepared.name}"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "ngsgd_mpi.cli", f"--train-data={prepared / 'train'}",
                    f"--valid-data={prepared / 'valid.h5'}", f"--out-dir={out}", *TRAIN_ARGS],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return Model.load(str(out / "final.h5"))


def held_out(model: Model, prepared: Path):
    """(log-posteriors, labels) of every held-out frame."""
    info = data.open_partition(str(prepared / "valid.h5"))
    network = model.network()
    outs, labels = [], []
    for X, y in data.iterate_utterance_blocks(info, model.context, model.context):
        outs.append(np.asarray(network.log_probs(X), np.float64))
        labels.append(y)
    return np.concatenate(outs), np.concatenate(labels)


def rules(model: Model) -> dict:
    """name -> offsets subtracted from log p(s | x) (None: the posterior itself)."""
    freq = model.class_priors
    return {
        "log-posterior (no prior)": None,
        "label frequencies floored at 1e-8 (the old rule)": np.log(np.maximum(freq, 1e-8)),
        "label frequencies + disable unseen (P2-P3, models without P1)":
            priors.log_prior_offsets(freq, model.class_counts),
        "averaged posteriors (nnet2, P1), nothing disabled":
            priors.log_prior_offsets(model.posterior_priors, None),
        "averaged posteriors + disable unseen (P1-P3, the rule now)":
            priors.log_prior_offsets(model.posterior_priors, model.class_counts),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("| data | held-out frames | classes (unseen in training) | rule | frames won by an unseen class "
              "| frame accuracy |")
        print("|---|---|---|---|---|---|")
        for name, make in (("YesNo (mono)", prepare_yesno), ("Digits-like", prepare_digits_like)):
            prepared = make(work)
            model = train(prepared, work)
            log_post, labels = held_out(model, prepared)
            unseen = np.asarray(model.class_counts) == 0
            for rule, offsets in rules(model).items():
                scores = log_post if offsets is None else log_post - offsets
                best = scores.argmax(1)
                print(f"| {name} | {len(labels):,} | {len(unseen)} ({int(unseen.sum())}) | {rule} | "
                      f"{100 * unseen[best].mean():.1f} % | {100 * (best == labels).mean():.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
