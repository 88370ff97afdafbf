"""``ngsgd-decode``: log-likelihoods + HCLG -> words, and WER in Kaldi's layout.

Per utterance, with the (T x P) pdf log-likelihoods L (from the network, or
read with ``--loglikes``) and the graph's transition model:

1. Kaldi's DecodableMatrixScaledMapped: transition-id k reads pdf(k) (D1)::

       acoustic cost of an arc with input label k at frame t = -acwt * L[t, pdf(k)]

2. Kaldi's LatticeFasterDecoder (:mod:`ngsgd_mpi.lattice_faster`: ``--beam``,
   ``--max-active``, ``--lattice-beam``) over HCLG gives the raw lattice; each
   arc has a graph cost g and an acoustic cost a.
3. For every LM weight LMWT and word insertion penalty WIP the 1-best path
   minimises, as ``lattice-scale --inv-acoustic-scale=LMWT |
   lattice-add-penalty | lattice-best-path`` on Kaldi's lattices (D2)::

       g + WIP * [arc has a word] + a / (acwt * LMWT)

   The decoder's own 1-best (minimising g + a, what gmm-latgen-faster prints)
   goes to ``log/decode.log`` with Kaldi's "Log-like per frame" line,
   -(g + a) / T.

The hypotheses and, with ``--ref``, the error rates are written in Kaldi's
``scoring_kaldi`` layout (:mod:`ngsgd_mpi.scoring`).  Several ranks
(``mpiexec -n N``) take utterances round-robin; each writes its results to
``OUT/.part.<rank>.json``; once every rank is done rank 0 merges them in
input order.

The graph is ``GRAPH_DIR/HCLG.fst`` (OpenFst vector or Kaldi's const FST,
:mod:`ngsgd_mpi.kaldi.fst`) with ``words.txt``; transition-ids are mapped to
pdfs by ``GRAPH_DIR/trans.mdl`` (what ``ngsgd-mkgraph`` writes), else
``--transition-model`` or ``GRAPH_DIR/../final.mdl`` (a Kaldi
``exp/tri1/graph`` next to its ``final.mdl``).  Labels are checked against the
model and the word table before the search trusts them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from ngsgd_mpi.faults import EXIT_OK, InputError, report_bad_input

from ngsgd_mpi import lattice_faster, scoring
from ngsgd_mpi.kaldi.fst import read_fst, read_symbol_table
from ngsgd_mpi.kaldi.model import read_transition_model



class DecodeError(InputError):
    """Bad input to ngsgd-decode (one line)."""


# --------------------------------------------------------------------------- the graph

class Graph:
    """A decoding graph ready for the search.

    Fields:
      hclg:     the HCLG as the search's arrays (lattice_faster.Hclg).
      words:    {word id: symbol} of words.txt.
      num_pdfs: columns the log-likelihoods must have.
      kind:     "word" or "phone" (graph_info.json of ngsgd-mkgraph; Kaldi graphs: "word").
    """

    def __init__(self, graph_dir: str, transition_model: str | None = None):
        hclg_path = os.path.join(graph_dir, "HCLG.fst")
        words_path = os.path.join(graph_dir, "words.txt")
        if transition_model is None:
            candidates = [os.path.join(graph_dir, "trans.mdl"), os.path.join(graph_dir, os.pardir, "final.mdl")]
            transition_model = next((c for c in candidates if os.path.isfile(c)), None)
            if transition_model is None:
                raise DecodeError(f"{graph_dir}: no trans.mdl here and no ../final.mdl; "
                                  "pass --transition-model (the final.mdl the graph was built with)")
        trans_model = read_transition_model(transition_model)
        self.words = {i: word for word, i in read_symbol_table(words_path, "the word table").items()}
        hclg = read_fst(hclg_path)
        num_tids = trans_model.num_transition_ids
        if hclg.start < 0:
            raise DecodeError(f"{hclg_path}: the graph is empty (no start state)")
        if hclg.num_arcs:
            top = int(hclg.arcs["ilabel"].max())
            if top > num_tids:
                raise DecodeError(f"{hclg_path}: input label {top} exceeds the {num_tids} transition-ids "
                                  f"of {transition_model} (a graph of another model?)")
            unknown = np.setdiff1d(np.unique(hclg.arcs["olabel"]), np.array(list(self.words), np.int64))
            if len(unknown):
                raise DecodeError(f"{words_path} does not match {hclg_path}: output label {unknown[0]} "
                                  f"is not in the word table ({len(unknown)} such labels)")
        self.hclg = lattice_faster.hclg_for_search(hclg, trans_model.tid2pdf)
        self.num_pdfs = trans_model.num_pdfs
        self.transition_model = transition_model
        self.kind = "word"
        info = os.path.join(graph_dir, "graph_info.json")
        if os.path.isfile(info):
            try:
                with open(info, encoding="utf-8") as f:
                    self.kind = json.load(f).get("kind", "word")
            except (OSError, ValueError) as exc:
                raise DecodeError(f"{info}: not a JSON object ({exc})") from None


# --------------------------------------------------------------------------- decoding

class Decoder:
    """One graph, Kaldi's lattice-faster search (:mod:`ngsgd_mpi.lattice_faster`), (D1), (D2):
    a raw lattice per utterance (``--beam``, ``--max-active``, ``--lattice-beam``) from
    which every (LMWT, WIP) gets its 1-best."""

    def __init__(self, graph: Graph, acwt: float = 0.1, beam: float = 13.0, lattice_beam: float = 6.0,
                 max_active: int = 7000):
        self.graph, self.acwt = graph, acwt
        self.search = lattice_faster.LatticeFasterDecoder(graph.hclg, beam, lattice_beam, max_active)

    def decode(self, loglikes: np.ndarray, lmwts, penalties):
        """(the search's own 1-best as (word ids, graph cost, acoustic cost) or None when
        nothing survived, {(LMWT, WIP): word ids}, whether a final state was reached)."""
        lattice, reached_final = self.search.decode(loglikes, self.acwt)
        if lattice is None:
            return None, {}, reached_final
        combos = [(lmwt, wip) for wip in penalties for lmwt in lmwts]
        scales = np.array([1.0] + [1.0 / (self.acwt * lmwt) for lmwt, _ in combos])
        wips = np.array([0.0] + [float(wip) for _, wip in combos])
        results = lattice_faster.best_paths(lattice, scales, wips)
        return results[0], {combo: words for combo, (words, _, _) in zip(combos, results[1:])}, reached_final


# --------------------------------------------------------------------------- log-likelihood sources

def network_log_likelihoods(model_path: str, data_dir: str, rank: int, size: int, prior_floor: float = 1e-8,
                            batch_frames: int = 8192):
    """(utt, T x P pdf log-likelihoods) of the utterances rank, rank + size, ... of
    ``DATA_DIR/feats.scp`` from a trained model: log p(s|x) - log p(s), exactly what
    ``ngsgd-forward --data DATA_DIR --output log-likelihood`` writes (the model's input
    pipeline, its priors; ngsgd_mpi.inference is the one place that runs the network)."""
    from ngsgd_mpi import inference  # noqa: PLC0415 - the HDF5 model layer; --loglikes does not need it

    model = inference.load_model(model_path)
    offsets = inference.log_prior_offsets(model, model_path, prior_floor=prior_floor,
                                          log=inference.to_stderr if rank == 0 else lambda message: None)
    utterances = inference.model_utterances(model, model_path, data_dir=data_dir, rank=rank, size=size)
    yield from inference.score_utterances(model, model.network(), utterances, "log-likelihood", offsets,
                                          batch_frames, where=f"--data {data_dir}")


def table_log_likelihoods(rspecifier: str, rank: int, size: int):
    """(utt, matrix) of entries rank, rank + size, ... of a Kaldi matrix table."""
    from ngsgd_mpi.inference import read_utterances  # noqa: PLC0415

    yield from read_utterances(rspecifier, rank, size)


# --------------------------------------------------------------------------- one rank's work

def parse_lmwt(spec: str) -> list[int]:
    """``7:17`` -> [7, ..., 17] (score_kaldi_wer.sh's --min-lmwt / --max-lmwt); ``10`` -> [10]."""
    low, _, high = spec.partition(":")
    try:
        low_i, high_i = int(low), int(high or low)
    except ValueError:
        raise DecodeError(f"--lmwt must be MIN:MAX (integers), got {spec!r}") from None
    if not 0 < low_i <= high_i:
        raise DecodeError(f"--lmwt must satisfy 0 < MIN <= MAX, got {spec!r}")
    return list(range(low_i, high_i + 1))


def parse_penalties(spec: str) -> list[str]:
    penalties = [p for p in spec.split(",") if p]
    try:
        if not penalties or any(not np.isfinite(float(p)) for p in penalties):
            raise ValueError
    except ValueError:
        raise DecodeError(f"--word-ins-penalty must be a comma-separated list of numbers, got {spec!r}") from None
    return penalties


def decode_share(decoder: Decoder, utterances, rank: int, size: int, lmwts, penalties, ref=None,
                 ref_path: str = "") -> dict:
    """Decode this rank's utterances; returns the part record (see :func:`merge_parts`)."""
    records, decode_seconds, frames = [], 0.0, 0
    for k, (utt, loglikes) in enumerate(utterances):
        if ref is not None:
            scoring.check_references(ref, [utt], ref_path)
        loglikes = np.asarray(loglikes)
        num_pdfs = decoder.graph.num_pdfs
        if loglikes.ndim != 2 or loglikes.dtype.kind != "f" or (len(loglikes) and loglikes.shape[1] != num_pdfs):
            raise DecodeError(f"utterance {utt!r}: log-likelihoods of shape {loglikes.shape}, the transition "
                              f"model {decoder.graph.transition_model} has {decoder.graph.num_pdfs} pdfs")
        if not np.all(np.isfinite(loglikes)):
            raise DecodeError(f"utterance {utt!r}: log-likelihoods are not all finite")
        record = {"utt": utt, "index": k * size + rank, "frames": len(loglikes), "reached_final": False}
        start = time.perf_counter()
        if len(loglikes):
            best, hyps, record["reached_final"] = decoder.decode(loglikes, lmwts, penalties)
            if best is not None:
                record["words"], graph_cost, acoustic_cost = best
                record["cost"] = [graph_cost, acoustic_cost]
                record["hyps"] = {f"{lmwt} {wip}": w for (lmwt, wip), w in hyps.items()}
        decode_seconds += time.perf_counter() - start
        frames += len(loglikes)
        records.append(record)
    return {"rank": rank, "utterances": records, "decode_seconds": decode_seconds, "frames": frames}


def part_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f".part.{rank}.json")


def write_json(path: str, record) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- rank 0: merge and score

def merge_parts(out_dir: str, size: int, graph: Graph, lmwts, penalties, ref: str | None) -> dict:
    """Read every rank's part, write the Kaldi layout; returns the summary."""
    parts = []
    for r in range(size):
        with open(part_path(out_dir, r), encoding="utf-8") as f:
            parts.append(json.load(f))
    records = sorted((u for p in parts for u in p["utterances"]), key=lambda u: u["index"])
    words = graph.words
    hyps = {(lmwt, wip): {} for wip in penalties for lmwt in lmwts}
    log = []
    for u in records:
        if "hyps" not in u:
            log.append(f"WARNING: failed to decode utterance {u['utt']} ({u['frames']} frames)")
            continue
        for key, ids in u["hyps"].items():
            lmwt, wip = key.split(" ")
            hyps[(int(lmwt), wip)][u["utt"]] = [words[i] for i in ids]
        if not u["reached_final"]:
            log.append(f"WARNING: no final state reached for utterance {u['utt']}: partial output")
        log.append(" ".join([u["utt"], *(words[i] for i in u["words"])]))
        log.append(f"Log-like per frame for utterance {u['utt']} is "
                   f"{-sum(u['cost']) / max(u['frames'], 1):.6g} over {u['frames']} frames.")
    os.makedirs(os.path.join(out_dir, "log"), exist_ok=True)
    with open(os.path.join(out_dir, "log", "decode.log.tmp"), "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in log)
    os.replace(os.path.join(out_dir, "log", "decode.log.tmp"), os.path.join(out_dir, "log", "decode.log"))
    scoring.write_hypotheses(out_dir, hyps)
    frames = sum(p["frames"] for p in parts)
    summary = {"utterances": len(records), "frames": frames,
               "decoded": sum("hyps" in u for u in records),
               "partial": sum("hyps" in u and not u["reached_final"] for u in records),
               "decode_seconds_per_rank": [round(p["decode_seconds"], 3) for p in parts],
               "frames_per_second_per_rank": frames / max(sum(p["decode_seconds"] for p in parts), 1e-9),
               "kind": graph.kind}
    if ref is not None:
        line, counts, lmwt, wip = scoring.score(out_dir, ref, hyps, penalties, lmwts)
        summary.update({"best_wer": line, "wer": counts.wer, "lmwt": lmwt, "wip": wip})
    return summary


# --------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ngsgd-decode", description="Decode with an HCLG graph and score in Kaldi's "
                                "scoring_kaldi layout (mpiexec -n N: ranks split the utterances).")
    p.add_argument("--graph-dir", required=True, help="HCLG.fst + words.txt (+ trans.mdl from ngsgd-mkgraph)")
    p.add_argument("--transition-model", help="Kaldi model whose TransitionModel the graph was built with "
                   "(default: GRAPH_DIR/trans.mdl, else GRAPH_DIR/../final.mdl)")
    p.add_argument("--model", help="trained model (final.h5), with --data")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="Kaldi data directory (feats.scp) to run --model on")
    source.add_argument("--loglikes", help="rspecifier of per-utterance pdf log-likelihood matrices")
    p.add_argument("--acwt", type=float, default=0.1, help="acoustic scale of the decoder")
    p.add_argument("--beam", type=float, default=13.0, help="decoding beam")
    p.add_argument("--lattice-beam", type=float, default=6.0,
                   help="lattice beam: how much worse than the best a lattice path may be")
    p.add_argument("--max-active", type=int, default=7000, help="most tokens a frame expands")
    p.add_argument("--lmwt", default=None, help="LM weights MIN:MAX for the 1-best hypotheses (default 7:17)")
    p.add_argument("--word-ins-penalty", default=None,
                   help="comma-separated word insertion penalties (default 0.0,0.5,1.0)")
    p.add_argument("--ref", help="reference text (Kaldi 'text', or 'phone_text' for a phone graph)")
    p.add_argument("--prior-floor", type=float, default=1e-8, help="floor of the model's class priors")
    p.add_argument("--batch-frames", type=int, default=8192, help="frames per network forward pass")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--out", required=True, help="decode directory to write")
    return p


def scoring_grid(args) -> tuple[list[int], list[str]]:
    """The (LM weights, word insertion penalties) to write hypotheses for."""
    if not args.acwt > 0:
        raise DecodeError(f"--acwt must be > 0, got {args.acwt}")
    return parse_lmwt(args.lmwt or "7:17"), parse_penalties(args.word_ins_penalty or "0.0,0.5,1.0")


def _rank_work(args, dist) -> Graph:
    """Everything one rank does before the merge: its share of the utterances decoded into
    OUT/.part.<rank>.json; returns the graph."""
    try:
        lmwts, penalties = scoring_grid(args)
        if not args.beam > 0 or not args.lattice_beam > 0 or args.max_active < 1:
            raise DecodeError("--beam and --lattice-beam must be > 0, --max-active >= 1")
        if args.data is not None and args.model is None:
            raise DecodeError("--data needs --model (or give --loglikes)")
        ref = scoring.read_text(args.ref) if args.ref else None
        graph = Graph(args.graph_dir, args.transition_model)
        decoder = Decoder(graph, args.acwt, args.beam, args.lattice_beam, args.max_active)
        if args.data is not None:
            from ngsgd_mpi import backend  # noqa: PLC0415

            backend.use_device(args.device)
            utterances = network_log_likelihoods(args.model, args.data, dist.rank, dist.size, args.prior_floor,
                                                 args.batch_frames)
        else:
            utterances = table_log_likelihoods(args.loglikes, dist.rank, dist.size)
        os.makedirs(args.out, exist_ok=True)
        part = decode_share(decoder, utterances, dist.rank, dist.size, lmwts, penalties, ref, args.ref or "")
        write_json(part_path(args.out, dist.rank), part)
        return graph
    except OSError as exc:
        raise DecodeError(str(exc)) from None


def main(argv=None) -> int:
    from ngsgd_mpi import distributed  # noqa: PLC0415

    args = build_parser().parse_args(argv)
    dist = distributed.init()
    with distributed.abort_on_exception(dist, prog="ngsgd-decode"):
        start = time.time()
        try:
            # bad input on any rank: every rank stops with the same one-line errors
            graph = dist.agree(lambda: _rank_work(args, dist), "the decoding of every rank's share")
            summary = dist.agree(lambda: None if dist.rank else merge_parts(
                args.out, dist.size, graph, *scoring_grid(args), args.ref), "the merge of the ranks' results")
        except InputError as exc:
            return report_bad_input("ngsgd-decode", exc, speak=dist.rank == 0)
        finally:
            if dist.rank == 0:
                for r in range(dist.size):
                    if os.path.exists(part_path(args.out, r)):
                        os.remove(part_path(args.out, r))
        if dist.rank == 0:
            _report(summary, args, time.time() - start)
    return EXIT_OK


def _report(summary: dict, args, seconds: float) -> None:
    rate = summary["frames_per_second_per_rank"]
    print(f"ngsgd-decode: {summary['decoded']}/{summary['utterances']} utterances decoded "
          f"({summary['partial']} partial), {summary['frames']:,} frames, decoder {rate:,.0f} frames/s per rank, "
          f"{seconds:.1f} s in all -> {args.out}")
    if "best_wer" in summary:
        what = "PER" if summary["kind"] == "phone" else "WER"
        print(f"ngsgd-decode: {what} {summary['wer']:.2f} % at LM weight {summary['lmwt']}, word insertion "
              f"penalty {summary['wip']}: {summary['best_wer']}")


if __name__ == "__main__":
    sys.exit(main())
