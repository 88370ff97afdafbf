"""Synthetic, licence-free speech corpus for ngsgd_mpi (espeak-ng + augmentation + Kaldi fbank).

* ``ngsgd-make-corpus`` (:mod:`ngsgd_mpi.corpus.make_corpus`) generates Kaldi data
  directories; needs the Debian packages espeak-ng / libespeak-ng1 and the
  ``corpus`` extra (kaldi-native-fbank, kaldiio, scipy).
* :func:`load_demo_corpus` loads the small corpus shipped with the package
  (numpy only, no espeak).
* :func:`write_kaldi_data_dir` writes in-memory utterances as a Kaldi data directory.

See docs/corpus.md.
"""

from ngsgd_mpi.corpus.demo import load_demo_corpus
from ngsgd_mpi.corpus.kaldi_dir import KaldiDataDirWriter, Utterance, write_kaldi_data_dir

__all__ = ["KaldiDataDirWriter", "Utterance", "load_demo_corpus", "write_kaldi_data_dir"]
