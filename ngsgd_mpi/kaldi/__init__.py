"""Kaldi formats without Kaldi binaries: tables (rspecifiers, arks, scps), feature
pipelines (CMVN, deltas) and model files (TransitionModel, diagonal GMMs)."""
