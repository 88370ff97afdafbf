"""Kaldi's LatticeFasterDecoder over an HCLG held as arrays, compiled with Numba.

Why our own: the PyPI bindings of Kaldi's decoders offer either a lattice
search without max-active (kaldi-decoder's LatticeSimpleDecoder: every token
within the beam survives, 41 frames/s on our word graph) or a max-active
search without a lattice (FasterDecoder, kaldi-hmm-gmm's
``decode_utterance_lattice_faster``: the 1-best only).  Scoring every LM
weight needs both.  This module is ``lattice-faster-decoder.cc`` step for
step, on flat arrays, down to the order in which a frame's tokens are
expanded (that of Kaldi's hash of the newest frame's tokens; a token is found
by its state in a dense array instead), so its 1-best is Kaldi's also where
max-active binds (tests/test_lattice_faster.py checks it against Kaldi's C++).

The search (t = 0 .. T-1 frames; a *token* is an HCLG state alive at a frame,
with ``cost`` the best path cost from the start to it, graph + acoustic; its
*links* are the arcs it took, the raw lattice's arcs):

(F1) Acoustic cost of an emitting arc (input label = transition-id k) at
     frame t, Kaldi's DecodableMatrixScaledMapped::

         a = -acwt * L[t, pdf(k)]

(F2) Cutoff of frame t (GetCutoff), from the best token cost b and the
     costs of all tokens of frame t::

         if more than max_active tokens and c_max < b + beam:
             cutoff = c_max (the max_active-th cost), adaptive beam = c_max - b + beam_delta
         elif at most min_active tokens:
             no cutoff (every token expands), adaptive beam = inf
         elif c_min > b + beam:
             cutoff = c_min (the min_active-th cost), adaptive beam = c_min - b + beam_delta
         else:
             cutoff = b + beam, adaptive beam = beam

     Tokens of frame t with cost > cutoff do not expand.
(F3) Frame t+1's cutoff starts at min over the best token's emitting arcs of
     (cost + g + a + adaptive beam) and tightens as tokens are made: a new
     token of cost c >= the cutoff is not made; one with c + adaptive beam
     below it lowers it to c + adaptive beam.  So which tokens are made
     depends on the order frame t's tokens are expanded in (_order_insert).
(F4) Epsilon arcs (input label 0) are followed within the frame while the
     cost stays below that cutoff, re-expanding a token whose cost fell (its
     old epsilon links are dropped first).
(F5) Lattice pruning, every ``PRUNE_INTERVAL`` frames and at the end, from
     the newest frame backwards: a link src -> dst with graph and acoustic
     costs g, a has the *extra cost*::

         e(link) = extra(dst) + (cost(src) + g + a - cost(dst))

     the most its best completion is worse than the best path; links with
     e > lattice_beam are dropped, extra(src) = min over its links (newest
     frame: 0), tokens with no links left are dropped.  At the end the last
     frame's tokens start from extra = cost + final - best final cost (final
     = 0 for all if no final state was reached) and the pruning runs with
     delta 0 over every frame.

The raw lattice has one state per surviving token and one arc per link,
weight (g, a) (Kaldi's LatticeWeight); the last frame's tokens are final with
weight (final cost, 0) (or (0, 0) for all when none is final).  Costs are
float64 throughout, so Kaldi's per-frame cost offsets (kept for float32
precision) are not needed; the arcs are written as float32 like Kaldi's.

Memory: tokens and links are records (one cache line touched per visit) in
fixed-capacity pools with free lists (:class:`Pools`); when one fills up,
the utterance is searched again with both doubled (:class:`LatticeFasterDecoder`
keeps the larger pools).  The small helpers are inlined: a call would pass
the pools by value and count references to each of their arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ngsgd_mpi.faults import InputError
from ngsgd_mpi.kaldi.fst import LATTICE_ARC_DTYPE, ArcFst

try:
    from numba import njit
except ImportError as exc:  # the 'decode' extra
    raise ImportError("decoding needs the 'decode' extra (numba is missing): pip install 'ngsgd_mpi[decode]'") \
        from exc

# Kaldi's LatticeFasterDecoderConfig defaults for what ngsgd-decode does not expose ...
BEAM_DELTA = 0.5
# ... except how often and how finely the lattice is pruned during the search (Kaldi: every 25
# frames, delta = 0.1 * lattice_beam).  That pruning only drops what the final pruning would
# (the newest frame's extra cost 0 is a lower bound, and so are extra costs not yet updated by
# less than delta), so the lattice is the same; pruning 4x less often keeps more tokens alive
# (about PRUNE_INTERVAL * max_active) and halves the time of the search on our word graph.
PRUNE_INTERVAL = 100
PRUNE_SCALE = 0.5
FINAL_DELTA = 1e-5           # relative tolerance of the final pruning's fixed point (Kaldi's ApproxEqual)

HASH_RATIO = 2.0             # Kaldi's --hash-ratio
INF = np.inf
# counters of Pools
FREE_TOKENS, FREE_LINKS, OVERFLOW, HASH_SIZE, ORDER_HEAD, TAIL_BUCKET = range(6)


class LatticeError(InputError):
    """A lattice the 1-best pass cannot use (from a graph with an epsilon cycle)."""


#: one HCLG state: its epsilon arcs are arcs[first:emitting], its emitting arcs arcs[emitting:end]
STATE = np.dtype([("first", "<i4"), ("emitting", "<i4"), ("end", "<i4")])
#: one HCLG arc (pdf = the pdf of the transition-id ilabel; 0 on epsilon arcs)
ARC = np.dtype([("pdf", "<i4"), ("nextstate", "<i4"), ("ilabel", "<i4"), ("olabel", "<i4"), ("weight", "<f8")])
#: a token: an HCLG state alive at a frame.  cost: the best path cost from the start to
#: it; extra: (F5); links: its first link (-1: none); next: the next token of its frame;
#: order: the next token of the newest frame in the order the search visits them
#: (see _order_insert).  32 bytes: two tokens per cache line.
TOKEN = np.dtype([("cost", "<f8"), ("extra", "<f8"), ("links", "<i4"), ("next", "<i4"), ("state", "<i4"),
                  ("order", "<i4")])
#: a link: an arc a token took to ``dest``, with its graph cost g and acoustic cost a (F1)
LINK = np.dtype([("dest", "<i4"), ("ilabel", "<i4"), ("olabel", "<i4"), ("next", "<i4"), ("graph", "<f8"),
                 ("acoustic", "<f8")])


class Hclg(NamedTuple):
    """The graph for the search, one record per state and per arc (a state's arcs share
    cache lines: the search is bound by memory latency)."""
    states: np.ndarray       # (S,) STATE
    arcs: np.ndarray         # (A,) ARC
    final: np.ndarray        # (S,) float64 final cost, inf where not final
    start: int


def hclg_for_search(fst: ArcFst, tid2pdf: np.ndarray) -> Hclg:
    """:class:`Hclg` from a standard-arc FST whose input labels are transition-ids
    (``tid2pdf[k]`` = pdf of transition-id k, index 0 unused)."""
    src = fst.sources().astype(np.int64)
    order = np.lexsort((fst.arcs["ilabel"] != 0, src))       # per state: epsilon arcs, then emitting
    fst_arcs = fst.arcs[order]
    arcs = np.empty(fst.num_arcs, ARC)
    for name in ("ilabel", "olabel", "nextstate", "weight"):
        arcs[name] = fst_arcs[name]
    arcs["pdf"] = np.where(fst_arcs["ilabel"] > 0, np.asarray(tid2pdf, np.int64)[fst_arcs["ilabel"]], 0)
    states = np.empty(fst.num_states, STATE)
    states["first"], states["end"] = fst.offsets[:-1], fst.offsets[1:]
    states["emitting"] = fst.offsets[:-1] + np.bincount(src[fst_arcs["ilabel"] == 0], minlength=fst.num_states)
    return Hclg(states, arcs, fst.final.astype(np.float64), int(fst.start))


class Pools(NamedTuple):
    """Tokens, links and the per-frame bookkeeping of one search (reused across utterances).

    A token's links form a singly linked list from its ``links``; the tokens of
    frame f one from ``frame_head[f]`` through ``next`` (-1 ends a list).  Free
    slots are stacks (``token_free[:counters[FREE_TOKENS]]``)."""
    tokens: np.ndarray        # TOKEN
    token_free: np.ndarray
    links: np.ndarray         # LINK
    link_free: np.ndarray
    counters: np.ndarray      # FREE_TOKENS, FREE_LINKS, OVERFLOW, and HASH_SIZE, ORDER_HEAD,
                              # TAIL_BUCKET of the visiting order (_order_insert)
    frame_head: np.ndarray    # (frames + 1,) first token of each frame
    prune_links: np.ndarray   # (frames + 1,) Kaldi's must_prune_forward_links
    prune_tokens: np.ndarray  # (frames + 1,) Kaldi's must_prune_tokens
    state_token: np.ndarray   # (S,) the newest frame's token of each state, -1: none
    queue: np.ndarray         # states whose epsilon arcs are to be followed (F4)
    scratch: np.ndarray       # one frame's token costs (F2)
    bucket_last: np.ndarray   # the visiting order's last token of each bucket, -1: none


def new_pools(num_states: int, tokens: int, links: int, frames: int, hash_size: int = 1000) -> Pools:
    """Empty pools; ``hash_size``: Kaldi's hash of the newest frame's tokens starts at 1000
    states and grows, never shrinks, over a decoder's utterances (it sets the visiting order)."""
    i32 = np.int32
    counters = np.zeros(6, np.int64)
    counters[HASH_SIZE] = hash_size
    return Pools(np.empty(tokens, TOKEN), np.empty(tokens, i32), np.empty(links, LINK), np.empty(links, i32),
                 counters, np.empty(frames + 1, i32), np.empty(frames + 1, np.bool_),
                 np.empty(frames + 1, np.bool_), np.full(num_states, -1, i32), np.empty(tokens, i32),
                 np.empty(tokens, np.float64), np.full(max(hash_size, int(HASH_RATIO * tokens) + 1), -1, i32))


# --------------------------------------------------------------------------- pool operations

@njit(cache=True, inline="always")
def _find_or_add(p, state, cost, frame):
    """Kaldi's FindOrAddToken in the newest frame: (token, whether it is new or cheaper);
    token -1 when the pool is full."""
    t = p.state_token[state]
    if t >= 0:
        tok = p.tokens[t]
        if tok.cost > cost:
            tok.cost = cost
            return t, True
        return t, False
    n = p.counters[FREE_TOKENS]
    if n == 0:
        p.counters[OVERFLOW] = 1
        return -1, False
    p.counters[FREE_TOKENS] = n - 1
    t = p.token_free[n - 1]
    tok = p.tokens[t]
    tok.cost, tok.extra, tok.links, tok.state, tok.next = cost, 0.0, -1, state, p.frame_head[frame]
    p.frame_head[frame] = t
    p.state_token[state] = t
    _order_insert(p, t, state)
    return t, True


@njit(cache=True, inline="always")
def _order_insert(p, t, state):
    """Kaldi's HashList::Insert, which decides the order in which a frame's tokens are
    expanded, and so (F3)'s tightening cutoff, which tokens are made, and which survive
    max-active: states hash to bucket state % HASH_SIZE; the list holds the buckets in the
    order they were first used, each bucket's tokens in the order they were made."""
    index = state % p.counters[HASH_SIZE]
    last = p.bucket_last[index]
    if last < 0:                                          # a new bucket goes at the end
        if p.counters[TAIL_BUCKET] < 0:
            p.counters[ORDER_HEAD] = t
        else:
            p.tokens[p.bucket_last[p.counters[TAIL_BUCKET]]].order = t
        p.tokens[t].order = -1
        p.counters[TAIL_BUCKET] = index
    else:                                                 # after the last token of its bucket
        p.tokens[t].order = p.tokens[last].order
        p.tokens[last].order = t
    p.bucket_last[index] = t


@njit(cache=True)
def _order_clear(p):
    """Kaldi's HashList::Clear: the newest frame's tokens in visiting order (head token),
    and an empty order for the next frame."""
    head = p.counters[ORDER_HEAD]
    t = head
    while t >= 0:
        p.bucket_last[p.tokens[t].state % p.counters[HASH_SIZE]] = -1
        t = p.tokens[t].order
    p.counters[ORDER_HEAD] = p.counters[TAIL_BUCKET] = -1
    return head


@njit(cache=True, inline="always")
def _add_link(p, src, dest, ilabel, olabel, graph_cost, acoustic_cost):
    n = p.counters[FREE_LINKS]
    if n == 0:
        p.counters[OVERFLOW] = 1
        return
    p.counters[FREE_LINKS] = n - 1
    k = p.link_free[n - 1]
    link, tok = p.links[k], p.tokens[src]
    link.dest, link.ilabel, link.olabel, link.graph, link.acoustic = dest, ilabel, olabel, graph_cost, acoustic_cost
    link.next = tok.links
    tok.links = k


@njit(cache=True, inline="always")
def _free_link(p, k):
    p.link_free[p.counters[FREE_LINKS]] = k
    p.counters[FREE_LINKS] += 1


@njit(cache=True, inline="always")
def _delete_links(p, t):
    k = p.tokens[t].links
    while k >= 0:
        following = p.links[k].next
        _free_link(p, k)
        k = following
    p.tokens[t].links = -1


# --------------------------------------------------------------------------- the search

@njit(cache=True)
def _process_emitting(p, g, frame_costs, frame, beam, max_active, min_active):
    """Tokens of frame ``frame`` through the emitting arcs into frame + 1 (F1)-(F3);
    returns frame + 1's cutoff."""
    head = _order_clear(p)
    n, best, best_tok = 0, INF, -1
    t = head
    while t >= 0:
        tok = p.tokens[t]
        if n == len(p.scratch):
            p.counters[OVERFLOW] = 1
            return INF
        p.scratch[n] = tok.cost
        if tok.cost < best:
            best, best_tok = tok.cost, t
        p.state_token[tok.state] = -1                  # the state map now belongs to frame + 1
        n += 1
        t = tok.order
    # (F2)
    cutoff, adaptive_beam = best + beam, beam
    if n > max_active:
        max_active_cost = np.partition(p.scratch[:n], max_active)[max_active]
        if max_active_cost < cutoff:
            cutoff, adaptive_beam = max_active_cost, max_active_cost - best + BEAM_DELTA
    if cutoff == best + beam:
        if n <= min_active:
            cutoff = adaptive_beam = INF
        else:
            min_active_cost = np.partition(p.scratch[:n], min_active)[min_active] if min_active else best
            if min_active_cost > cutoff:
                cutoff, adaptive_beam = min_active_cost, min_active_cost - best + BEAM_DELTA
    # Kaldi's PossiblyResizeHash
    hash_size = np.int64(np.float32(n) * np.float32(HASH_RATIO))
    if hash_size > p.counters[HASH_SIZE]:
        if hash_size > len(p.bucket_last):
            p.counters[OVERFLOW] = 1
            return INF
        p.counters[HASH_SIZE] = hash_size
    # (F3) the first estimate of the next cutoff, from the best token
    next_cutoff = INF
    if best_tok >= 0:
        state = g.states[p.tokens[best_tok].state]
        for a in range(state.emitting, state.end):
            arc = g.arcs[a]
            next_cutoff = min(next_cutoff, best + arc.weight + frame_costs[arc.pdf] + adaptive_beam)
    t = head
    while t >= 0:
        tok = p.tokens[t]
        if tok.cost <= cutoff:
            state = g.states[tok.state]
            for a in range(state.emitting, state.end):
                arc = g.arcs[a]
                acoustic = frame_costs[arc.pdf]
                total = tok.cost + acoustic + arc.weight
                if total >= next_cutoff:
                    continue
                if total + adaptive_beam < next_cutoff:
                    next_cutoff = total + adaptive_beam
                dest, _ = _find_or_add(p, arc.nextstate, total, frame + 1)
                if dest < 0:
                    return INF
                _add_link(p, t, dest, arc.ilabel, arc.olabel, arc.weight, acoustic)
        t = tok.order
    return next_cutoff


@njit(cache=True, inline="always")
def _push(p, q, state):
    """Push onto the queue; returns its new length (-1: full)."""
    if q == len(p.queue):
        p.counters[OVERFLOW] = 1
        return -1
    p.queue[q] = state
    return q + 1


@njit(cache=True)
def _process_nonemitting(p, g, frame, cutoff):
    """(F4): the epsilon closure of frame ``frame``'s tokens below ``cutoff``."""
    q = 0
    t = p.counters[ORDER_HEAD]
    while t >= 0:
        tok = p.tokens[t]
        state = g.states[tok.state]
        if state.emitting > state.first:
            q = _push(p, q, tok.state)
            if q < 0:
                return
        t = tok.order
    while q > 0:
        q -= 1
        s = p.queue[q]
        t = p.state_token[s]
        cost = p.tokens[t].cost
        if cost >= cutoff:
            continue
        _delete_links(p, t)                            # re-visited: its epsilon links are made anew
        state = g.states[s]
        for a in range(state.first, state.emitting):
            arc = g.arcs[a]
            total = cost + arc.weight
            if total < cutoff:
                dest, changed = _find_or_add(p, arc.nextstate, total, frame)
                if dest < 0:
                    return
                _add_link(p, t, dest, 0, arc.olabel, arc.weight, 0.0)
                following = g.states[arc.nextstate]
                if changed and following.emitting > following.first:
                    q = _push(p, q, arc.nextstate)
                    if q < 0:
                        return


@njit(cache=True)
def _approx_equal(a, b, relative):
    """Kaldi's ApproxEqual: equal infinities are equal, an infinite difference is not."""
    if a == b:
        return True
    diff = abs(a - b)
    return diff != INF and diff <= relative * (abs(a) + abs(b))


@njit(cache=True)
def _prune_links(p, frame, delta, lattice_beam, at_end, final_costs, best_final):
    """(F5) on the links of frame ``frame``'s tokens, to a fixed point (epsilon links
    stay within the frame, so one token's extra cost can depend on another's);
    returns (some extra cost changed, some link was dropped).
    ``at_end``: the last frame once the search is over, whose extra costs start from
    cost + final_costs[state] - best_final and converge to a relative ``delta``."""
    changed_any = pruned = False
    changed = True
    while changed:
        changed = False
        t = p.frame_head[frame]
        while t >= 0:
            tok = p.tokens[t]
            extra = tok.cost + final_costs[tok.state] - best_final if at_end else INF
            previous, k = -1, tok.links
            while k >= 0:
                link = p.links[k]
                following = link.next
                dest = p.tokens[link.dest]
                e = dest.extra + (tok.cost + link.acoustic + link.graph - dest.cost)
                if e > lattice_beam:
                    if previous >= 0:
                        p.links[previous].next = following
                    else:
                        tok.links = following
                    _free_link(p, k)
                    pruned = True
                else:
                    extra = min(extra, max(e, 0.0))
                    previous = k
                k = following
            if at_end:
                if extra > lattice_beam:
                    extra = INF
                changed |= not _approx_equal(extra, tok.extra, delta)
            else:
                changed |= abs(extra - tok.extra) > delta
            tok.extra = extra
            t = tok.next
        changed_any |= changed
    return changed_any, pruned


@njit(cache=True)
def _prune_tokens(p, frame):
    """Drop the tokens of ``frame`` that no link of a surviving path leaves (extra = inf)."""
    previous, t = -1, p.frame_head[frame]
    while t >= 0:
        tok = p.tokens[t]
        following = tok.next
        if tok.extra == INF:
            _delete_links(p, t)
            if previous >= 0:
                p.tokens[previous].next = following
            else:
                p.frame_head[frame] = following
            p.token_free[p.counters[FREE_TOKENS]] = t
            p.counters[FREE_TOKENS] += 1
        else:
            previous = t
        t = following


@njit(cache=True)
def _prune_active(p, frames_done, delta, lattice_beam, final):
    """Kaldi's PruneActiveTokens: frames before the newest, newest first, only where a
    later frame's change can have reached."""
    for f in range(frames_done - 1, -1, -1):
        if p.prune_links[f]:
            changed, pruned = _prune_links(p, f, delta, lattice_beam, False, final, 0.0)
            if changed and f > 0:
                p.prune_links[f - 1] = True
            if pruned:
                p.prune_tokens[f] = True
            p.prune_links[f] = False
        if f + 1 < frames_done and p.prune_tokens[f + 1]:
            _prune_tokens(p, f + 1)
            p.prune_tokens[f + 1] = False


@njit(cache=True)
def _search(p, g, costs, beam, max_active, min_active, lattice_beam, prune_interval, prune_scale):
    """Decode + FinalizeDecoding of one utterance; ``costs`` = -acwt * L (T x P).
    Returns (completed, a final state was reached)."""
    num_frames = costs.shape[0]
    p.counters[FREE_TOKENS], p.counters[FREE_LINKS], p.counters[OVERFLOW] = len(p.tokens), len(p.links), 0
    for i in range(len(p.tokens)):
        p.token_free[i] = len(p.tokens) - 1 - i
    for i in range(len(p.links)):
        p.link_free[i] = len(p.links) - 1 - i
    p.frame_head[:num_frames + 1] = -1
    p.prune_links[:num_frames + 1] = True
    p.prune_tokens[:num_frames + 1] = True
    p.state_token[:] = -1
    p.bucket_last[:] = -1
    p.counters[ORDER_HEAD] = p.counters[TAIL_BUCKET] = -1
    # the start token (slot 0) and its epsilon closure (InitDecoding)
    _find_or_add(p, g.start, 0.0, 0)
    _process_nonemitting(p, g, 0, beam)
    for frame in range(num_frames):
        if frame % prune_interval == 0:
            _prune_active(p, frame, prune_scale * lattice_beam, lattice_beam, g.final)
        cutoff = _process_emitting(p, g, costs[frame], frame, beam, max_active, min_active)
        _process_nonemitting(p, g, frame + 1, cutoff)
        if p.counters[OVERFLOW]:
            return False, False
    # final costs of the last frame (ComputeFinalCosts)
    best = best_final = INF
    t = p.frame_head[num_frames]
    while t >= 0:
        tok = p.tokens[t]
        best = min(best, tok.cost)
        best_final = min(best_final, tok.cost + g.final[tok.state])
        t = tok.next
    reached_final = best_final < INF
    # (F5) at the end: the last frame from its final costs, then every frame with delta 0
    final_costs = g.final if reached_final else np.zeros(len(g.final))
    _prune_links(p, num_frames, FINAL_DELTA, lattice_beam, True, final_costs, best_final if reached_final else best)
    for f in range(num_frames - 1, -1, -1):
        _prune_links(p, f, 0.0, lattice_beam, False, final_costs, 0.0)
        _prune_tokens(p, f + 1)
    _prune_tokens(p, 0)
    return True, reached_final


@njit(cache=True)
def _raw_lattice(p, g, num_frames, reached_final):
    """Kaldi's GetRawLattice: (state of each arc's source, arcs' ilabel, olabel, nextstate,
    arcs' graph and acoustic costs, final (states x 2), start); empty when some frame has
    no token."""
    ids = np.full(len(p.tokens), -1, np.int64)
    num_states = num_arcs = 0
    for f in range(num_frames + 1):
        t = p.frame_head[f]
        if t < 0:
            num_states = 0
            break
        while t >= 0:
            ids[t] = num_states
            num_states += 1
            k = p.tokens[t].links
            while k >= 0:
                num_arcs += 1
                k = p.links[k].next
            t = p.tokens[t].next
    if num_states == 0:
        num_arcs = 0
    src = np.empty(num_arcs, np.int64)
    labels = np.empty((num_arcs, 3), np.int64)
    weights = np.empty((num_arcs, 2), np.float64)
    final = np.full((num_states, 2), INF)
    i = 0
    for f in range(num_frames + 1 if num_states else 0):
        t = p.frame_head[f]
        while t >= 0:
            tok = p.tokens[t]
            k = tok.links
            while k >= 0:
                link = p.links[k]
                src[i] = ids[t]
                labels[i, 0], labels[i, 1], labels[i, 2] = link.ilabel, link.olabel, ids[link.dest]
                weights[i, 0], weights[i, 1] = link.graph, link.acoustic
                i += 1
                k = link.next
            if f == num_frames:
                if not reached_final:
                    final[ids[t], 0] = final[ids[t], 1] = 0.0
                elif g.final[tok.state] < INF:
                    final[ids[t], 0], final[ids[t], 1] = g.final[tok.state], 0.0
            t = tok.next
    return src, labels, weights, final, ids[0]              # the start token is slot 0


# --------------------------------------------------------------------------- 1-best paths

@njit(cache=True)
def _best_paths(offsets, nextstate, olabel, graph, acoustic, final, start, scales, penalties):
    """Kahn's algorithm over the acyclic lattice, K weightings at once: arc weight
    graph + penalties[k] * [olabel != 0] + scales[k] * acoustic.  Returns (status: 0 ok,
    1 an arc into the start state, 2 cyclic or unreachable states; (K, words) word ids,
    padded with 0; (K,) graph cost; (K,) acoustic cost; (K,) whether a final state was
    reachable)."""
    num_states, k_count = len(offsets) - 1, len(scales)
    pending = np.zeros(num_states, np.int64)           # incoming arcs not yet relaxed
    src = np.empty(len(nextstate), np.int64)
    for s in range(num_states):
        for a in range(offsets[s], offsets[s + 1]):
            pending[nextstate[a]] += 1
            src[a] = s
    cost = np.full((num_states, k_count), INF)
    back = np.full((num_states, k_count), -1, np.int64)
    ready = np.empty(num_states, np.int64)
    words = np.zeros((k_count, 0), np.int64)
    graph_cost, acoustic_cost, found = np.full(k_count, INF), np.full(k_count, INF), np.zeros(k_count, np.bool_)
    if pending[start]:
        return 1, words, graph_cost, acoustic_cost, found
    cost[start] = 0.0
    ready[0], n_ready, done = start, 1, 0
    while n_ready:
        n_ready -= 1
        s = ready[n_ready]
        done += 1
        for a in range(offsets[s], offsets[s + 1]):
            d = nextstate[a]
            for k in range(k_count):
                c = cost[s, k] + graph[a] + scales[k] * acoustic[a] + (penalties[k] if olabel[a] else 0.0)
                if c < cost[d, k]:
                    cost[d, k], back[d, k] = c, a
            pending[d] -= 1
            if pending[d] == 0:
                ready[n_ready] = d
                n_ready += 1
    if done != num_states:
        return 2, words, graph_cost, acoustic_cost, found
    ends = np.full(k_count, -1, np.int64)
    lengths = np.zeros(k_count, np.int64)
    for k in range(k_count):
        best = INF
        for s in range(num_states):
            c = cost[s, k] + final[s, 0] + scales[k] * final[s, 1]
            if c < best:
                best, ends[k] = c, s
        s = ends[k]
        while s >= 0 and s != start:
            lengths[k] += olabel[back[s, k]] != 0
            s = src[back[s, k]]
    words = np.zeros((k_count, max(1, lengths.max())), np.int64)
    for k in range(k_count):
        s = ends[k]
        if s < 0:
            continue
        found[k] = True
        graph_cost[k], acoustic_cost[k] = final[s, 0], final[s, 1]
        i = lengths[k]
        while s != start:
            a = back[s, k]
            if olabel[a]:
                i -= 1
                words[k, i] = olabel[a]
            graph_cost[k] += graph[a]
            acoustic_cost[k] += acoustic[a]
            s = src[a]
    return 0, words, graph_cost, acoustic_cost, found


def best_paths(lattice: ArcFst, acoustic_scales: np.ndarray, penalties: np.ndarray) -> list:
    """The best path of an acyclic lattice (arc type lattice4) under K weightings at once:
    path k minimises sum(graph + penalties[k] * [word]) + acoustic_scales[k] * sum(acoustic).
    Returns [(word ids, graph cost, acoustic cost)] per weighting ((), inf, inf: no
    final state)."""
    arcs = lattice.arcs
    status, words, graph, acoustic, found = _best_paths(
        lattice.offsets, arcs["nextstate"].astype(np.int64), arcs["olabel"].astype(np.int64),
        arcs["weight"][:, 0].astype(np.float64), arcs["weight"][:, 1].astype(np.float64),
        lattice.final.astype(np.float64), lattice.start, np.asarray(acoustic_scales, np.float64),
        np.asarray(penalties, np.float64))
    if status:
        raise LatticeError("the decoder's lattice has an arc into its start state" if status == 1 else
                           "the decoder's lattice is cyclic or has unreachable states (an epsilon cycle in HCLG?)")
    return [([int(w) for w in row if w], float(g), float(a)) if ok else ([], np.inf, np.inf)
            for row, g, a, ok in zip(words, graph, acoustic, found)]


class LatticeFasterDecoder:
    """One graph; :meth:`decode` gives an utterance's raw lattice (F1)-(F5).
    ``min_active`` (Kaldi's --min-active, default 200): at most this many tokens, a
    frame keeps them all."""

    def __init__(self, graph: Hclg, beam: float = 13.0, lattice_beam: float = 6.0, max_active: int = 7000,
                 min_active: int = 200):
        self.graph, self.beam, self.lattice_beam = graph, beam, lattice_beam
        self.max_active, self.min_active = max_active, min_active
        self.prune_interval, self.prune_scale = PRUNE_INTERVAL, PRUNE_SCALE
        tokens = min(max_active * (PRUNE_INTERVAL + 50), len(graph.final) * 1000)     # about what is alive
        self._pools = new_pools(len(graph.final), tokens=tokens, links=4 * tokens, frames=1000)

    def decode(self, loglikes: np.ndarray, acwt: float):
        """(raw lattice as an ArcFst of arc type lattice4, or None when no path survived;
        whether a final state was reached)."""
        costs = -acwt * np.asarray(loglikes, np.float64)
        num_frames = len(costs)
        hash_size = int(self._pools.counters[HASH_SIZE])
        while True:
            p = self._pools
            if len(p.frame_head) <= num_frames:
                self._pools = p = new_pools(len(self.graph.final), len(p.tokens), len(p.links), 2 * num_frames,
                                            hash_size)
            done, reached_final = _search(p, self.graph, costs, self.beam, self.max_active, self.min_active,
                                          self.lattice_beam, self.prune_interval, self.prune_scale)
            if done:
                break
            self._pools = new_pools(len(self.graph.final), 2 * len(p.tokens), 2 * len(p.links),
                                    len(p.frame_head) - 1, hash_size)
        src, labels, weights, final, start = _raw_lattice(self._pools, self.graph, num_frames, reached_final)
        if not len(final):
            return None, reached_final
        arcs = np.empty(len(src), LATTICE_ARC_DTYPE)
        arcs["ilabel"], arcs["olabel"], arcs["nextstate"] = labels[:, 0], labels[:, 1], labels[:, 2]
        arcs["weight"] = weights
        offsets = np.zeros(len(final) + 1, np.int64)
        np.cumsum(np.bincount(src, minlength=len(final)), out=offsets[1:])
        return ArcFst(int(start), final.astype(np.float32), offsets, arcs, "lattice4"), reached_final
