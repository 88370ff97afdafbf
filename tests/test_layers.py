"""Layers: Kaldi golden vectors (float32) and finite-difference gradients (float64)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ngsgd_mpi.layers import (Affine, FixedAffine, Normalize, Pnorm, Relu, Softmax,
                              SoftmaxCrossEntropy)

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared/reference/golden"
PNORM_FILES = sorted(GOLDEN.glob("nonlin_pnorm_*.npz"))


def rel_err(ours, ref):
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


def load_golden(path):
    with np.load(path) as z:
        cfg = json.loads(str(z["config_json"]))
        arrays = {k: z[k].astype(np.float32) for k in z.files if k != "config_json"}
    return cfg, arrays


def test_golden_files_present():
    # The golden set has p = 1 and p = 2 p-norm cases; fail loudly if the path is wrong.
    assert {p.name for p in PNORM_FILES} >= {"nonlin_pnorm_g10_p1.npz", "nonlin_pnorm_g10_p2.npz"}


@pytest.mark.parametrize("path", PNORM_FILES, ids=lambda p: p.stem)
def test_pnorm_golden(path):
    cfg, z = load_golden(path)
    dim_in, dim_out = z["pnorm_in"].shape[1], z["pnorm_out"].shape[1]
    assert dim_in // dim_out == cfg["group_size"]
    layer = Pnorm(dim_in, dim_out, p=cfg["p"])
    assert rel_err(layer.forward(z["pnorm_in"].copy()), z["pnorm_out"]) <= 2e-7
    in_deriv = layer.backward(z["pnorm_out_deriv"].copy())
    assert rel_err(in_deriv, z["pnorm_in_deriv"]) <= 2e-7
    # Row 0 has an all-zero group: Kaldi's derivative there is exactly 0.
    zero_group = np.all(z["pnorm_in"][0].reshape(dim_out, -1) == 0, axis=1)
    assert zero_group.any()
    assert np.all(in_deriv[0].reshape(dim_out, -1)[zero_group] == 0)


@pytest.mark.parametrize("path", PNORM_FILES, ids=lambda p: p.stem)
def test_normalize_golden(path):
    _, z = load_golden(path)
    x = z["pnorm_out"]
    layer = Normalize(x.shape[1])
    assert rel_err(layer.forward(x), z["norm_out"]) <= 2e-7
    in_deriv = layer.backward(z["norm_out_deriv"].copy())
    floored = np.all(x == 0, axis=1)
    assert floored.tolist()[:2] == [False, True]       # row 1 is the all-zero row
    assert rel_err(in_deriv[~floored], z["norm_in_deriv"][~floored]) <= 2e-7
    # Floor rows: dx = 2^33 dy exactly (the f^3 term is dropped), as Kaldi.
    np.testing.assert_array_equal(in_deriv[floored], z["norm_in_deriv"][floored])
    np.testing.assert_array_equal(in_deriv[floored], 2.0 ** 33 * z["norm_out_deriv"][floored])


@pytest.mark.parametrize("path", PNORM_FILES, ids=lambda p: p.stem)
def test_softmax_golden(path):
    _, z = load_golden(path)
    layer = Softmax(z["softmax_in"].shape[1])
    probs = layer.forward(z["softmax_in"])
    # Kaldi sums the exponentials sequentially in float32; ours is pairwise: ~1e-7 apart.
    assert rel_err(probs, z["softmax_out"]) <= 4e-7
    assert probs.min() == np.float32(1e-20)               # the golden has a floored row
    assert rel_err(layer.backward(z["softmax_out_deriv"].copy()), z["softmax_in_deriv"]) <= 6e-7


# ---------------------------------------------------------------------- finite differences

def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() w.r.t. every element of x (modified in place)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + eps
        plus = f()
        flat[i] = orig - eps
        minus = f()
        flat[i] = orig
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def check_layer_grad(layer, x, rtol=1e-6, eps=1e-6):
    """d sum(w * layer(x)) / dx from backward(w) vs central differences."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal(layer.forward(x.copy()).shape)
    analytic = layer.backward(w.copy())
    numeric = numeric_grad(lambda: float(np.sum(w * layer.forward(x.copy(), train=False))), x, eps)
    assert rel_err(analytic, numeric) <= rtol


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_pnorm_gradient(p):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 24))
    x += 0.3 * np.sign(x)          # away from 0, where p = 1 has a kink
    check_layer_grad(Pnorm(24, 6, p=p), x)


def test_pnorm_non_contiguous_input():
    x = np.random.default_rng(1).standard_normal((5, 24))
    expected = Pnorm(24, 6)
    expected.forward(x.copy())
    layer = Pnorm(24, 6)
    layer.forward(np.asfortranarray(x))
    dy = np.ones((5, 6))
    np.testing.assert_array_equal(layer.backward(dy.copy()), expected.backward(dy.copy()))


def test_pnorm_inf_ties_and_zero_groups():
    layer = Pnorm(6, 2, p=math.inf)
    x = np.array([[1.0, -2.0, 2.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(layer.forward(x.copy()), [[2.0, 0.0]])
    # Kaldi gives every tied maximum the derivative; a zero group gets none.
    np.testing.assert_array_equal(layer.backward(np.array([[3.0, 5.0]])),
                                  [[0.0, -3.0, 3.0, 0.0, 0.0, 0.0]])


def test_pnorm_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple"):
        Pnorm(25, 6)
    with pytest.raises(ValueError, match="p must be"):
        Pnorm(24, 6, p=0.5)
    with pytest.raises(ValueError, match="N x 24"):
        Pnorm(24, 6).forward(np.zeros((3, 20)))


def test_normalize_gradient():
    rng = np.random.default_rng(2)
    check_layer_grad(Normalize(7), rng.standard_normal((6, 7)))


def test_normalize_gradient_inside_floor():
    # Rows with mean square below 2^-66 are scaled by the constant 2^33, whose
    # true derivative is 2^33 dy (Kaldi's rule); perturbations stay inside the floor.
    x = np.full((2, 4), 1e-12)
    x[1] *= -0.5
    check_layer_grad(Normalize(4), x, eps=1e-14, rtol=1e-6)


def test_normalize_output_rms():
    rng = np.random.default_rng(3)
    y = Normalize(50).forward(rng.standard_normal((4, 50)) * [[1e-3], [1.0], [10.0], [1e5]])
    np.testing.assert_allclose(np.sqrt(np.mean(y ** 2, axis=1)), 1.0, rtol=1e-12)


def test_relu_gradient():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 9))
    x += 0.2 * np.sign(x)
    check_layer_grad(Relu(9), x)


def test_softmax_gradient():
    rng = np.random.default_rng(5)
    check_layer_grad(Softmax(8), 3 * rng.standard_normal((4, 8)))


def test_softmax_cross_entropy_gradient_and_value():
    rng = np.random.default_rng(6)
    logits = 3 * rng.standard_normal((6, 5))
    labels = rng.integers(0, 5, size=6)
    layer = SoftmaxCrossEntropy(5)

    def objective():
        return float(layer.forward(logits, train=False)[np.arange(6), labels].sum())

    log_probs = layer.forward(logits.copy())
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.testing.assert_allclose(log_probs, shifted - np.log(np.exp(shifted).sum(1, keepdims=True)),
                               rtol=1e-13)
    analytic = layer.backward(labels)
    assert rel_err(analytic, numeric_grad(objective, logits)) <= 1e-7
    np.testing.assert_allclose(analytic.sum(axis=1), 0.0, atol=1e-14)


def test_softmax_cross_entropy_floor():
    # A probability below 1e-20 is floored, as Kaldi: log p >= log(1e-20), deriv ~ onehot - p.
    layer = SoftmaxCrossEntropy(3)
    log_probs = layer.forward(np.array([[100.0, 0.0, -20.0]], np.float32))
    assert log_probs[0, 1] == np.float32(math.log(1e-20))
    assert np.isfinite(log_probs).all()
    deriv = layer.backward(np.array([2]))
    np.testing.assert_allclose(deriv, [[-1.0, -1e-20, 1.0 - 1e-20]], rtol=1e-6)


def test_affine_gradients_input_and_weights():
    rng = np.random.default_rng(8)
    linear, bias = rng.standard_normal((4, 6)), rng.standard_normal(4)
    x = rng.standard_normal((5, 6))
    w = rng.standard_normal((5, 4))
    layer = Affine(linear, bias)
    np.testing.assert_allclose(layer.forward(x), x @ linear.T + bias, rtol=1e-14)
    in_deriv = layer.backward(w)

    def objective():
        return float(np.sum(w * layer.forward(x, train=False)))

    assert rel_err(in_deriv, numeric_grad(objective, x)) <= 1e-8
    # What the updater consumes: the summed gradients G^T X and sum_n G_n.
    assert layer.input is x and layer.out_deriv is w
    assert rel_err(layer.out_deriv.T @ layer.input, numeric_grad(objective, linear)) <= 1e-8
    assert rel_err(layer.out_deriv.sum(axis=0), numeric_grad(objective, bias)) <= 1e-8
    assert layer.backward(w, need_input_deriv=False) is None


def test_backward_needs_a_training_forward():
    layer = Normalize(3)
    layer.forward(np.ones((2, 3)), train=False)
    with pytest.raises(ValueError, match="no cached forward"):
        layer.backward(np.ones((2, 3)))
    layer.forward(np.ones((2, 3)))
    layer.backward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="consumes"):     # the cache is used up
        layer.backward(np.ones((2, 3)))


def test_fixed_affine():
    rng = np.random.default_rng(9)
    matrix, bias = rng.standard_normal((3, 3)), rng.standard_normal(3)
    x = rng.standard_normal((4, 3))
    np.testing.assert_allclose(FixedAffine(matrix, bias).forward(x), x @ matrix.T + bias,
                               rtol=1e-14)
    data = rng.standard_normal((1000, 3)) * [1.0, 10.0, 0.1] + [5.0, -2.0, 0.0]
    norm = FixedAffine.from_mean_std(data.mean(axis=0), data.std(axis=0))
    y = norm.forward(data)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="std must be > 0"):
        FixedAffine.from_mean_std(np.zeros(3), np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="N x 3"):
        norm.forward(np.zeros((2, 4)))


# ---------------------------------------------------------------------- hot-path helpers

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_matmul_add_in_place(dtype, layout):
    """C += alpha A B written into C itself (for C/Fortran operands and strided
    views, alpha 1, -1 and other), with or without a reused product buffer."""
    from ngsgd_mpi.layers import matmul_add
    rng = np.random.default_rng(12)
    A = rng.standard_normal((7, 5)).astype(dtype)
    B = rng.standard_normal((5, 9)).astype(dtype)
    C = np.array(rng.standard_normal((7, 9)), dtype=dtype, order=layout)
    tolerance = 1e-6 if dtype == np.float32 else 1e-14
    for a, b in [(A, B), (np.asfortranarray(A), B), (A, np.asfortranarray(B)),
                 (np.ones((5, 7), dtype).T, B.T.copy().T),
                 (rng.standard_normal((7, 10)).astype(dtype)[:, ::2], B)]:   # strided: fallback
        for alpha, work in ((-0.5, None), (1.0, np.empty_like(C)), (-1.0, np.empty((7, 9), dtype))):
            expected = C.astype(np.float64) + alpha * (a.astype(np.float64) @ b)
            result = matmul_add(C, a, b, alpha=alpha, work=work)
            assert result is C
            np.testing.assert_allclose(C, expected, rtol=tolerance, atol=tolerance)


def test_training_outputs_reuse_buffers_evaluation_outputs_do_not():
    rng = np.random.default_rng(13)
    layers = [Affine(rng.standard_normal((20, 6)), rng.standard_normal(20)), Pnorm(20, 4),
              Normalize(4), SoftmaxCrossEntropy(4)]
    x = rng.standard_normal((3, 6))

    def forward(train):
        outputs, h = [], x
        for layer in layers:
            h = layer.forward(h, train)
            outputs.append(h)
        return outputs

    first = forward(True)
    values = [o.copy() for o in first]
    second = forward(True)
    assert all(np.shares_memory(a, b) for a, b in zip(first, second))   # same memory each step
    for a, b in zip(second, values):
        np.testing.assert_array_equal(a, b)
    evaluation = forward(False)
    assert not any(np.shares_memory(a, b) for a, b in zip(evaluation, second))
    for a, b in zip(evaluation, values):
        np.testing.assert_allclose(a, b, rtol=1e-14)
    kept = [a.copy() for a in evaluation]
    x = 2 * x
    forward(True)                                   # must not write over evaluation results
    for a, b in zip(evaluation, kept):
        np.testing.assert_array_equal(a, b)
