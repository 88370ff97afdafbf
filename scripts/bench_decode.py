#!/usr/bin/env python3
"""Decoding speed: frames/s of ngsgd-decode's search at 1 thread, per graph, beside Kaldi's.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python scripts/bench_decode.py \\
        --graph word=runs/x/graph_word --graph phone=runs/x/graph_phone \\
        (--model runs/x/final.h5 --data data/synth/test | --loglikes scp:ll.scp) \\
        [--utterances 40] [--beam 13] [--max-active 7000] [--reps 2] [--searches ours,kaldi] \\
        [--oracle-boost B --ali RSPEC] [--json out.json]

What is measured (docs/benchmarks.md has the figures):

* The log-likelihoods of the first ``--utterances`` utterances are computed
  first (network forward, timed separately: "network frames/s", so the
  decoder can be set beside what feeds it); then every (graph, search) pair
  decodes them all, ``--reps`` times, interleaved; the figure is the best
  repetition's frames per second of process CPU time (single-threaded code on
  a shared machine: wall time measures the other jobs), wall time beside it.
* ``ours``: what ngsgd-decode does per utterance: the lattice search
  (ngsgd_mpi.lattice_faster) and the 1-best for LM weights 7..17 and
  penalties 0, 0.5, 1, split into the two.
* ``kaldi``: Kaldi's own LatticeFasterDecoder (C++, kaldi-hmm-gmm's binding)
  with the same beam, max-active, min-active and lattice beam, lattice not
  determinized, its 1-best only; it needs kaldi-hmm-gmm installed.  Its
  1-best words are compared with ours ("same 1-best").
* Tokens: the mean lattice states per frame, a proxy of the search width.
* ``--oracle-boost B --ali ALI``: add B to the log-likelihood of each frame's
  aligned pdf, a stand-in for a sharper model (the search narrows as the
  best pdf stands out), to show how speed depends on the model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ngsgd_mpi import decode, lattice_faster  # noqa: E402
from ngsgd_mpi.kaldi.fst import read_fst, to_kaldifst  # noqa: E402
from ngsgd_mpi.kaldi.model import read_transition_model  # noqa: E402

LMWTS, PENALTIES = list(range(7, 18)), ["0.0", "0.5", "1.0"]


def load_loglikes(args) -> tuple[list, float]:
    start = time.process_time()
    if args.loglikes:
        source = decode.table_log_likelihoods(args.loglikes, 0, 1)
    else:
        source = decode.network_log_likelihoods(args.model, args.data, 0, 1)
    utts = []
    for utt, ll in source:
        utts.append((utt, np.asarray(ll, np.float32)))
        if len(utts) == args.utterances:
            break
    seconds = time.process_time() - start
    if args.oracle_boost:
        from ngsgd_mpi.kaldi.tables import INT_VECTOR, IndexedTable

        alignment = IndexedTable(args.ali, INT_VECTOR, "--ali")
        alignment.index()
        for i, (utt, ll) in enumerate(utts):
            labels = alignment.read(utt)[:len(ll)]
            boosted = ll.copy()
            boosted[np.arange(len(labels)), labels] += args.oracle_boost
            utts[i] = (utt, boosted)
        alignment.close()
    return utts, seconds


def time_ours(decoder: decode.Decoder, utts) -> dict:
    search = paths = 0.0
    states, words = 0, []
    combos = [(lmwt, wip) for wip in PENALTIES for lmwt in LMWTS]
    scales = np.array([1.0] + [1 / (decoder.acwt * lm) for lm, _ in combos])
    penalties = np.array([0.0] + [float(w) for _, w in combos])
    wall = time.perf_counter()
    for _, ll in utts:
        t0 = time.process_time()
        lattice, _ = decoder.search.decode(ll, decoder.acwt)
        t1 = time.process_time()
        best = lattice_faster.best_paths(lattice, scales, penalties)[0][0] if lattice is not None else []
        t2 = time.process_time()
        search, paths, states = search + t1 - t0, paths + t2 - t1, states + (lattice.num_states if lattice else 0)
        words.append(best)
    return {"search_s": search, "paths_s": paths, "states": states, "wall_s": time.perf_counter() - wall,
            "words": words}


class KaldiLatticeFaster:
    """Kaldi's LatticeFasterDecoder (C++, kaldi-hmm-gmm's binding) with the settings of
    one of our searches; the binding returns the 1-best only.  Its
    decode_utterance_lattice_faster wants a TransitionModel, used only to determinize
    the lattice, which is switched off: a one-phone model stands in.  (The tests use
    it as their oracle.)"""

    TOPOLOGY = ("<Topology> <TopologyEntry> <ForPhones> 1 </ForPhones> <State> 0 <PdfClass> 0 "
                "<Transition> 0 0.5 <Transition> 1 0.5 </State> <State> 1 </State> </TopologyEntry> </Topology>")

    def __init__(self, fst, tid2pdf: np.ndarray, search: lattice_faster.LatticeFasterDecoder):
        import kaldi_hmm_gmm as khg  # noqa: PLC0415 - optional: the reference

        self.khg, self.tid2pdf = khg, tid2pdf
        topology = khg.HmmTopology()
        topology.read(self.TOPOLOGY)
        tree = khg.monophone_context_dependency(topology.phones, topology.get_phone_to_num_pdf_classes())
        self.trans_model = khg.TransitionModel(tree, topology)
        config = khg.LatticeFasterDecoderConfig(beam=search.beam, max_active=search.max_active,
                                                min_active=search.min_active, lattice_beam=search.lattice_beam,
                                                determinize_lattice=False)
        self.fst = to_kaldifst(fst)                     # the decoder keeps a pointer to it
        self.decoder = khg.LatticeFasterDecoderStdVectorFst(self.fst, config)

    def best(self, loglikes: np.ndarray, acwt: float) -> tuple[list, float]:
        """(words, graph + acoustic cost) of the 1-best of (T x pdfs) log-likelihoods."""
        scores = (acwt * loglikes[:, self.tid2pdf[1:]]).astype(np.float32)   # DecodableCtc: label k = column k-1
        ok, _, words, likelihood = self.khg.decode_utterance_lattice_faster(
            self.decoder, self.khg.DecodableCtc(scores), self.trans_model, "utt", True)
        return (list(words), -likelihood) if ok else ([], np.inf)


def time_kaldi(kaldi: KaldiLatticeFaster, utts, acwt: float) -> dict:
    seconds, words = 0.0, []
    wall = time.perf_counter()
    for _, ll in utts:
        t0 = time.process_time()
        words.append(kaldi.best(ll, acwt)[0])
        seconds += time.process_time() - t0
    return {"search_s": seconds, "paths_s": 0.0, "states": 0, "wall_s": time.perf_counter() - wall, "words": words}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", action="append", required=True, help="NAME=GRAPH_DIR (repeatable)")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--loglikes")
    p.add_argument("--utterances", type=int, default=40)
    p.add_argument("--beam", type=float, default=13.0)
    p.add_argument("--max-active", type=int, default=7000)
    p.add_argument("--lattice-beam", type=float, default=6.0)
    p.add_argument("--acwt", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--searches", default="ours,kaldi", help="ours and/or kaldi (Kaldi's LatticeFasterDecoder)")
    p.add_argument("--oracle-boost", type=float, default=0.0, help="added to the aligned pdf's log-likelihood")
    p.add_argument("--ali", help="alignment (pdf per frame) for --oracle-boost")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not args.loglikes and not (args.model and args.data):
        p.error("give --loglikes, or --model and --data")
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(1):
        utts, network_s = load_loglikes(args)
        frames = sum(len(ll) for _, ll in utts)
        graphs = dict(g.split("=", 1) for g in args.graph)
        decoders = {}
        for name, path in graphs.items():
            ours = decode.Decoder(decode.Graph(path), args.acwt, args.beam, args.lattice_beam, args.max_active)
            ours.decode(utts[0][1][:10], [10], ["0.0"])                     # compiled before it is timed
            for search in args.searches.split(","):
                decoders[(name, search)] = ours if search == "ours" else KaldiLatticeFaster(
                    read_fst(os.path.join(path, "HCLG.fst")),
                    read_transition_model(ours.graph.transition_model).tid2pdf, ours.search)
        best: dict = {}
        for rep in range(args.reps):
            for key, decoder in decoders.items():
                timed = time_ours(decoder, utts) if key[1] == "ours" else time_kaldi(decoder, utts, args.acwt)
                total = timed["search_s"] + timed["paths_s"]
                if key not in best or total < best[key]["search_s"] + best[key]["paths_s"]:
                    best[key] = timed
    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for i in threadpool_info()]
    report = {"utterances": len(utts), "frames": frames, "beam": args.beam, "acwt": args.acwt,
              "max_active": args.max_active, "lattice_beam": args.lattice_beam,
              "oracle_boost": args.oracle_boost,
              "network_frames_per_s": frames / network_s if not args.loglikes else None,
              "load_average": os.getloadavg(), "blas": blas, "python": platform.python_version(),
              "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                     "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
              "runs": []}
    if report["network_frames_per_s"]:
        print(f"network forward: {report['network_frames_per_s']:,.0f} frames/s ({frames:,} frames, "
              f"{len(utts)} utterances)")
    for (name, search), t in best.items():
        total = t["search_s"] + t["paths_s"]
        run = {"graph": name, "search": search, "frames_per_s": frames / total,
               "wall_frames_per_s": frames / t["wall_s"], "search_frames_per_s": frames / t["search_s"],
               "paths_share": t["paths_s"] / total, "lattice_states_per_frame": t["states"] / frames}
        if search == "kaldi" and (name, "ours") in best:
            run["same_1best"] = sum(a == b for a, b in zip(t["words"], best[(name, "ours")]["words"]))
        report["runs"].append(run)
        print(f"{name:>6} {search:>5}: {run['frames_per_s']:8,.0f} frames/s CPU ({run['wall_frames_per_s']:,.0f} wall)"
              + (f" (search {run['search_frames_per_s']:,.0f}/s, 1-best pass {100 * run['paths_share']:.0f} %, "
                 f"{run['lattice_states_per_frame']:.0f} lattice states/frame)" if search == "ours" else "")
              + (f" same 1-best as ours: {run['same_1best']}/{len(utts)}" if "same_1best" in run else ""))
    print(f"load average {report['load_average'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
