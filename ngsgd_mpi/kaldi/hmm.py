"""Kaldi's HMM graph pieces on arc tables: the H transducer and add-self-loops.

Ports of ``hmm/hmm-utils.cc`` (GetHmmAsFsa, GetHTransducer, AddSelfLoops with
``reorder=true``) and ``fstext`` helpers (MakeLoopFst,
MakePrecedingInputSymbolsSameClass), so that graphs for any context-dependency
can be built without Kaldi binaries (kaldi-hmm-gmm builds H only for the
monophone trees it can construct).

H maps transition-ids to the input labels of CLG (context windows).  For
every window it holds the phone's HMM *without self-loops*; an arc for the
non-self-loop transition ``tid`` of HMM state j costs (H1)::

    -transition_scale * (log p(tid) - log(1 - p_loop(j)))

and the HMM's final state returns to the loop state by an epsilon.  After
H o CLG is determinized, :func:`add_self_loops` puts back each state's
self-loop (reordered: a self-loop follows the forward transition of its own
transition-state, so it hangs on the state that transition leads to) (H2)::

    self-loop cost         -self_loop_scale * log p_loop
    every arc out, final   += -self_loop_scale * log(1 - p_loop)
"""

from __future__ import annotations

import numpy as np

from ngsgd_mpi.faults import InputError

from ngsgd_mpi.kaldi.fst import ARC_DTYPE, ArcFst
from ngsgd_mpi.kaldi.model import NO_PDF, TransitionModel


class GraphError(InputError):
    """A graph that cannot be built from the given model / context windows."""


def _is_disambig(window) -> bool:
    # GetHTransducer: a negative symbol, or the lone 0 that compose_context uses for #-1
    return len(window) == 1 and window[0] <= 0


def h_transducer(ilabels, pdf_of, trans_model: TransitionModel, central: int,
                 transition_scale: float = 1.0) -> tuple[ArcFst, list[int]]:
    """(H, disambiguation tids) for the context windows ``ilabels`` of CLG.

    ``pdf_of(window, pdf_class)`` is the context dependency (Kaldi's tree);
    ``ilabels[0]`` must be the empty window (epsilon).  Disambiguation windows
    get new input symbols num_transition_ids + 1, + 2, ... (returned in order).
    """
    if not ilabels or len(ilabels[0]) != 0:
        raise GraphError("ilabel info must start with the empty (epsilon) window")
    topo = trans_model.topology
    src, arcs = [], []                 # H's arcs as parallel lists
    num_states = 1
    cache: dict[tuple, tuple] = {}     # (phone, pdfs) -> first arc (ilabel, weight, nextstate)
    disambig, next_disambig = [], trans_model.num_transition_ids + 1

    for i, window in enumerate(ilabels[1:], 1):
        window = list(window)
        if _is_disambig(window):
            # MakeTrivialAcceptor(new symbol): loop -> new state -> (eps) -> loop
            disambig.append(next_disambig)
            src += [0, num_states]
            arcs += [(next_disambig, i, 0.0, num_states), (0, 0, 0.0, 0)]
            next_disambig += 1
            num_states += 1
            continue
        phone = window[central]
        if phone not in topo.phone2entry:
            raise GraphError(f"context window {window}: phone {phone} is not in the model's topology")
        entry = topo.entry(phone)
        pdfs = tuple(pdf_of(window, c) for c in range(topo.num_pdf_classes(phone)))
        key = (phone, pdfs)
        if key in cache:                       # MakeLoopFst shares identical HMMs
            ilabel, weight, nextstate = cache[key]
            src.append(0)
            arcs.append((ilabel, i, weight, nextstate))
            continue
        # GetHmmAsFsa: one FST state per HMM state, self-loops left out
        hmm_arcs = []
        for j, state in enumerate(entry):
            if state.forward_pdf_class == NO_PDF:
                if state.transitions:
                    raise GraphError(f"phone {phone}: non-emitting HMM states are not supported")
                continue
            fpdf, spdf = pdfs[state.forward_pdf_class], pdfs[state.self_loop_pdf_class]
            try:
                tstate = trans_model.tstate_of(phone, j, fpdf, spdf)
            except KeyError:
                raise GraphError(f"context window {window}: the model has no transition state for "
                                 f"phone {phone}, HMM state {j}, pdfs {fpdf}/{spdf} (model and tree "
                                 "do not match)") from None
            for k, (dest, _) in enumerate(state.transitions):
                if dest == j:
                    continue
                tid = trans_model.transition_id(tstate, k)
                hmm_arcs.append((j, tid, -transition_scale * trans_model.log_prob_ignoring_self_loops(tid), dest))
        start_arcs = [a for a in hmm_arcs if a[0] == 0]
        share_start = len(start_arcs) == 1 and all(a[3] != 0 for a in hmm_arcs)
        state_map = {}
        for j in range(len(entry)):
            if j == 0 and share_start:
                state_map[j] = 0
            else:
                state_map[j] = num_states
                num_states += 1
        if not share_start:
            src.append(0)
            arcs.append((0, i, 0.0, state_map[0]))
            cache[key] = (0, 0.0, state_map[0])
        for j, tid, weight, dest in hmm_arcs:
            shared = j == 0 and share_start
            src.append(state_map[j])
            arcs.append((tid, i if shared else 0, weight, state_map[dest]))
            if shared:
                cache[key] = (tid, weight, state_map[dest])
        src.append(state_map[len(entry) - 1])          # HMM final state -> loop state
        arcs.append((0, 0, 0.0, 0))
    final = np.full(num_states, np.inf, np.float32)
    final[0] = 0.0
    return ArcFst.from_arcs(num_states, 0, src, np.array(arcs, ARC_DTYPE), final), disambig


def _tstate_class(ilabels: np.ndarray, trans_model: TransitionModel, disambig: set[int]) -> np.ndarray:
    """TidToTstateMapper: transition-state of a tid, 0 for epsilon / disambiguation symbols."""
    n = trans_model.num_transition_ids
    out = np.zeros(len(ilabels), np.int64)
    is_tid = (ilabels >= 1) & (ilabels <= n)
    if np.any(trans_model.tid_is_self_loop[ilabels[is_tid]]):
        raise GraphError("add-self-loops: the graph already has self-loops")
    other = ilabels[~is_tid & (ilabels != 0)]
    if len(other) and not set(np.unique(other).tolist()) <= disambig:
        raise GraphError("add-self-loops: an input label is neither a transition-id nor a "
                         "disambiguation symbol")
    out[is_tid] = trans_model.tid2tstate[ilabels[is_tid]]
    return out


def add_self_loops(fst: ArcFst, trans_model: TransitionModel, disambig_tids=(),
                   self_loop_scale: float = 0.1) -> ArcFst:
    """Kaldi's AddSelfLoops(reorder=true), equation (H2)."""
    if fst.num_states == 0:
        return fst
    disambig = set(int(d) for d in disambig_tids)
    src, arcs = fst.sources().astype(np.int64), fst.arcs.copy()
    final = fst.final.copy()
    num_states = fst.num_states
    cls = _tstate_class(arcs["ilabel"].astype(np.int64), trans_model, disambig)

    # MakePrecedingInputSymbolsSameClass(start_is_epsilon=true): every state must be
    # entered by arcs of one transition-state only; otherwise the non-epsilon arcs
    # of each class go through a new state with an epsilon into it.
    dest = arcs["nextstate"].astype(np.int64)
    incoming = np.concatenate([[fst.start], dest])
    in_class = np.concatenate([[0], cls])
    pairs = np.unique(np.stack([incoming, in_class], 1), axis=0)
    bad = np.unique(pairs[:, 0][np.r_[False, pairs[1:, 0] == pairs[:-1, 0]]])
    if len(bad):
        redirect = np.isin(dest, bad) & (arcs["ilabel"] != 0)
        pairs = np.stack([dest[redirect], cls[redirect]], 1)
        _, first = np.unique(pairs, axis=0, return_index=True)
        keys = pairs[np.sort(first)]                  # new states numbered in arc order, as Kaldi does
        new_ids = num_states + np.arange(len(keys))
        lookup = {tuple(k): int(n) for k, n in zip(keys.tolist(), new_ids)}
        arcs["nextstate"][redirect] = [lookup[(d, c)] for d, c in zip(dest[redirect].tolist(),
                                                                       cls[redirect].tolist())]
        eps = np.zeros(len(keys), ARC_DTYPE)
        eps["nextstate"] = keys[:, 0]
        src = np.concatenate([src, new_ids])
        arcs = np.concatenate([arcs, eps])
        cls = np.concatenate([cls, np.zeros(len(keys), np.int64)])
        final = np.concatenate([final, np.full(len(keys), np.inf, np.float32)])
        num_states += len(keys)

    state_in = np.zeros(num_states, np.int64)
    state_in[arcs["nextstate"]] = cls                 # consistent now, so any writer wins
    has = state_in > 0
    penalty = np.zeros(num_states)
    penalty[has] = -self_loop_scale * trans_model.non_self_loop_log_prob[state_in[has]]
    arcs["weight"] = (arcs["weight"] + penalty[src]).astype(np.float32)
    final = (final + penalty).astype(np.float32)
    loop_states = np.flatnonzero(has & (trans_model.tstate_self_loop[state_in] > 0))
    loop_tids = trans_model.tstate_self_loop[state_in[loop_states]]
    loops = np.zeros(len(loop_states), ARC_DTYPE)
    loops["ilabel"] = loop_tids
    loops["weight"] = -self_loop_scale * trans_model.log_probs[loop_tids]
    loops["nextstate"] = loop_states
    return ArcFst.from_arcs(num_states, fst.start, np.concatenate([src, loop_states]),
                            np.concatenate([arcs, loops]), final)
