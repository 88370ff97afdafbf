"""Multiply-add counts of one minibatch: the cost model shared by the
updaters' form choices (optim.py) and the benchmarks (scripts/bench_step.py).

Counts are of the GEMM-like work only (bias, elementwise passes and the r x r
host eigenproblems are left out); ``shapes`` are the (D_out, D_in) of the
affine layers, N the minibatch size.  The equation labels are those of
ng_online.py and ng_simple.py.

SGD (per layer: forward, input derivative except for the first layer, weight
gradient)::

    N·D_out·D_in · (2 if first layer else 3)

Online NG, one side on N x D at rank R = min(rank, D - 1), averaged over the
update period P (an updating call every P calls in steady state)::

    H = X Wᵀ  (N·D·R)    X̂ = X − H W  (N·D·R, when formed)             (O2)
    every P-th call: J = Hᵀ X (N·D·R), K = J Jᵀ (R²·D), L = Hᵀ H (N·R²),
                     W' = A B (R²·D)                                     (O9)

The output side of a layer is either formed (Ĝ = G − H_g W_g) or *factored*:
Ĝᵀ X̂ = Gᵀ X̂ − W_gᵀ (H_gᵀ X̂) costs R·(D_in+1)·(N + D_out) and the row norms
N·R² (O11).  :func:`use_factored_output` is the updater's choice.

Simple NG, one side R (N x D)::

    N >= D:  SYRK N·D²/2, inverse D³/2, Q = R G⁻¹ N·D²                   (S3)
    N <  D:  SYRK N²·D/2, inverse N³/2, Q = S⁻¹ R N²·D only if formed    (S4)

An unformed output side applies S⁻¹ to the scaled input side instead,
N²·(D_in+1) (:func:`simple_output_formed` decides).
"""

from __future__ import annotations

# Factor the online output side only below this fraction of the formed side's
# multiply-adds: the factored update adds a D_out x D_in pass that the count
# does not see (measured: 512 x 3000 layers gain, 128 x (101 -> 1000) at 0.89 loses 2 %).
FACTORED_MARGIN = 0.85


def sgd_macs(shapes, N: int) -> int:
    """One SGD minibatch."""
    return sum(N * o * i * (2 if k == 0 else 3) for k, (o, i) in enumerate(shapes))


def online_side_macs(N: int, D: int, rank: int, period: int, formed: bool) -> float:
    """One online preconditioner call on N x D, averaged over the update period."""
    R = min(rank, D - 1)
    if R < 1:
        return 0.0
    update = N * D * R + R * R * D + N * R * R + R * R * D
    return N * D * R * (2 if formed else 1) + update / period


def factored_output_macs(N: int, D_in: int, D_out: int, rank: int) -> int:
    """Extra work of the factored output side: H_gᵀ X̂, W_gᵀ (H_gᵀ X̂), the row norms."""
    R = min(rank, D_out - 1)
    return R * N * (D_in + 1) + D_out * R * (D_in + 1) + N * R * R


def use_factored_output(N: int, D_in: int, D_out: int, rank: int) -> bool:
    """Whether the online updater leaves Ĝ unformed for this layer."""
    R = min(rank, D_out - 1)
    if R < 1:
        return False
    return R * (D_in + 1) * (D_out + N) < FACTORED_MARGIN * R * N * D_out


def online_extra_macs(shapes, N: int, rank_in: int, rank_out: int, period: int,
                      output_form: str = "auto") -> float:
    """NG-online work beyond SGD per minibatch.  ``output_form``: "auto" (what
    the updater does), "formed" or "factored" (every layer)."""
    if output_form not in ("auto", "formed", "factored"):
        raise ValueError(f"output_form must be 'auto', 'formed' or 'factored', got {output_form!r}")
    total = 0.0
    for o, i in shapes:
        factored = (output_form == "factored" or output_form == "auto"
                    and use_factored_output(N, i, o, rank_out))
        total += online_side_macs(N, i + 1, rank_in, period, formed=True)
        total += online_side_macs(N, o, rank_out, period, formed=not factored)
        if factored:
            total += factored_output_macs(N, i, o, rank_out)
    return total


def simple_side_macs(N: int, D: int, formed: bool = True) -> float:
    """One leave-one-out preconditioner call on N x D (``formed``: P built)."""
    if N < 2:
        return 0.0
    if N >= D:
        return N * D * D / 2 + D ** 3 / 2 + N * D * D
    return N * N * D / 2 + N ** 3 / 2 + (N * N * D if formed else 0)


def simple_output_formed(N: int, D_in: int, D_out: int) -> bool:
    """Whether the simple updater forms the output side's P (else it applies
    S⁻¹ to the N x (D_in + 1) input side: cheaper when D_in + 1 < D_out)."""
    return N >= D_out or D_in + 1 >= D_out


def simple_extra_macs(shapes, N: int) -> float:
    """NG-simple work beyond SGD per minibatch."""
    total = 0.0
    for o, i in shapes:
        formed = simple_output_formed(N, i, o)
        total += simple_side_macs(N, i + 1) + simple_side_macs(N, o, formed)
        if not formed:
            total += N * N * (i + 1)
    return total
