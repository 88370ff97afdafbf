"""Network: flat parameter buffer, initialisation, whole-network gradients, config."""

import math

import numpy as np
import pytest

from ngsgd_mpi.network import Network, NetworkConfig

SMALL = dict(input_dim=12, num_classes=7, num_hidden_layers=3, pnorm_input_dim=30,
             pnorm_output_dim=10)


def flat_gradient(net):
    """The summed gradient d objective / d params assembled from the cached (X, G)."""
    parts = []
    for layer in net.affine_layers:
        parts += [(layer.out_deriv.T @ layer.input).ravel(), layer.out_deriv.sum(axis=0)]
    return np.concatenate(parts)


def random_batch(net, n, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, net.config.input_dim)).astype(net.dtype)
    return X, rng.integers(0, net.config.num_classes, size=n)


def test_params_is_one_buffer_of_views():
    net = Network(NetworkConfig(**SMALL), seed=1)
    cfg = net.config
    assert net.params.dtype == np.float32 and net.params.ndim == 1
    assert net.params.size == cfg.num_params() == sum(
        math.prod(shape) for _, _, shape in net.layer_param_slices())
    assert len(net.affine_layers) == cfg.num_hidden_layers + 1
    offset = 0
    for (name, start, shape), array in zip(
            net.layer_param_slices(),
            [a for layer in net.affine_layers for a in (layer.linear, layer.bias)]):
        assert start == offset and array.shape == shape
        assert np.shares_memory(array, net.params)
        offset += math.prod(shape)
    assert [name for name, _, _ in net.layer_param_slices()[:2]] == ["affine0/linear",
                                                                     "affine0/bias"]
    # Writing the buffer changes what the layers compute.
    X, _ = random_batch(net, 4, 0)
    before = net.log_probs(X)
    _, start, shape = net.layer_param_slices()[-1]          # the final bias
    net.params[start:start + shape[0]] = np.arange(shape[0], dtype=np.float32)
    assert net.affine_layers[-1].bias[3] == 3.0
    assert not np.allclose(net.log_probs(X), before)
    net.set_params(np.zeros(net.params.size, np.float32))
    np.testing.assert_allclose(net.log_probs(X), -math.log(cfg.num_classes), rtol=1e-6)


def test_adopts_given_params_without_copy():
    cfg = NetworkConfig(**SMALL)
    buffer = np.random.default_rng(0).standard_normal(cfg.num_params()).astype(np.float32)
    net = Network(cfg, params=buffer)
    assert net.params is buffer
    assert np.shares_memory(net.affine_layers[2].linear, buffer)
    with pytest.raises(ValueError, match="params"):
        Network(cfg, params=buffer[:-1])
    with pytest.raises(ValueError, match="params"):
        Network(cfg, params=buffer.astype(np.float64))
    with pytest.raises(ValueError, match="set_params"):
        net.set_params(buffer[:-1])


def test_initialisation_recipe_statistics():
    cfg = NetworkConfig(input_dim=40, num_classes=50, num_hidden_layers=2, pnorm_input_dim=2000,
                        pnorm_output_dim=200)
    net = Network(cfg, seed=3)
    for layer in net.affine_layers[:-1]:
        assert abs(layer.linear.std() - 1 / math.sqrt(2000)) < 0.02 / math.sqrt(2000)
        assert abs(layer.linear.mean()) < 0.05 / math.sqrt(2000)
        assert abs(layer.bias.std() - 0.5) < 0.05
    assert not net.affine_layers[-1].linear.any() and not net.affine_layers[-1].bias.any()
    # Deterministic in the seed.
    np.testing.assert_array_equal(Network(cfg, seed=3).params, net.params)
    assert not np.array_equal(Network(cfg, seed=4).params, net.params)
    # A zero final layer predicts the uniform distribution.
    X, labels = random_batch(net, 8, 0)
    np.testing.assert_allclose(net.log_probs(X), -math.log(50), rtol=1e-6)
    relu = Network(NetworkConfig(input_dim=40, num_classes=5, num_hidden_layers=2,
                                 nonlinearity="relu", relu_dim=1000), seed=0)
    assert abs(relu.affine_layers[0].linear.std() - 1 / math.sqrt(40)) < 0.02 / math.sqrt(40)
    assert abs(relu.affine_layers[1].linear.std() - 1 / math.sqrt(1000)) < 0.02 / math.sqrt(1000)


@pytest.mark.parametrize("options", [
    dict(nonlinearity="pnorm", pnorm_p=2.0),
    dict(nonlinearity="pnorm", pnorm_p=1.0),
    dict(nonlinearity="pnorm", pnorm_p=math.inf),
    dict(nonlinearity="relu", relu_dim=9),
], ids=["pnorm2", "pnorm1", "pnorm_inf", "relu"])
def test_whole_network_gradient_matches_finite_differences(options):
    cfg = NetworkConfig(**{**SMALL, **options})
    rng = np.random.default_rng(11)
    params = rng.standard_normal(cfg.num_params())          # non-zero final layer too
    net = Network(cfg, params=params, dtype=np.float64)
    net.set_input_transform(rng.standard_normal((12, 12)), rng.standard_normal(12))
    X, labels = random_batch(net, 6, 12)
    obj, _ = net.train_gradients(X, labels)
    analytic = flat_gradient(net)

    def objective():
        return net.evaluate(X, labels)[0]

    assert objective() == obj
    numeric = np.zeros_like(params)
    eps = 1e-6
    for i in range(params.size):
        orig = params[i]
        params[i] = orig + eps
        plus = objective()
        params[i] = orig - eps
        minus = objective()
        params[i] = orig
        numeric[i] = (plus - minus) / (2 * eps)
    assert np.linalg.norm(analytic - numeric) <= 1e-6 * np.linalg.norm(numeric)
    # Every layer gets a real gradient.
    for name, start, shape in net.layer_param_slices():
        assert np.abs(analytic[start:start + math.prod(shape)]).max() > 1e-4, name


def test_stats_and_evaluate_leave_training_caches_alone():
    net = Network(NetworkConfig(**SMALL), seed=2, dtype=np.float64)
    rng = np.random.default_rng(0)
    net.params[:] = rng.standard_normal(net.params.size)
    X, labels = random_batch(net, 10, 1)
    obj, correct = net.train_gradients(X, labels)
    log_probs = net.log_probs(X)
    assert obj == pytest.approx(log_probs[np.arange(10), labels].sum(), rel=1e-12)
    assert correct == int((log_probs.argmax(axis=1) == labels).sum())
    cached = [(layer.input.copy(), layer.out_deriv.copy()) for layer in net.affine_layers]
    X2, labels2 = random_batch(net, 5, 2)
    net.evaluate(X2, labels2)                               # must not touch the caches
    for layer, (x, g) in zip(net.affine_layers, cached):
        np.testing.assert_array_equal(layer.input, x)
        np.testing.assert_array_equal(layer.out_deriv, g)
    assert net.evaluate(X, labels) == pytest.approx((obj, correct), rel=1e-12)


def test_input_normalization():
    cfg = NetworkConfig(**SMALL)
    net = Network(cfg, seed=0)
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((20, 12)) * 3 + 7).astype(np.float32)
    mean, std = X.mean(axis=0), X.std(axis=0)
    net.set_input_normalization(mean, std)
    reference = Network(cfg, seed=0)
    np.testing.assert_allclose(net.log_probs(X), reference.log_probs((X - mean) / std),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="input normalization"):
        net.set_input_normalization(mean[:-1], std[:-1])
    with pytest.raises(ValueError, match="input transform"):
        net.set_input_transform(np.eye(11), np.zeros(11))


def test_rejects_bad_inputs():
    net = Network(NetworkConfig(**SMALL), seed=0)
    with pytest.raises(ValueError, match="X: expected an N x 12 float32"):
        net.log_probs(np.zeros((3, 12)))                   # float64 into a float32 net
    with pytest.raises(ValueError, match="X: expected"):
        net.log_probs(np.zeros((3, 11), np.float32))
    with pytest.raises(ValueError, match="labels"):
        net.train_gradients(np.zeros((3, 12), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="labels"):
        net.evaluate(np.zeros((3, 12), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"labels: 2 value\(s\) outside \[0, 7\)"):
        net.train_gradients(np.zeros((3, 12), np.float32), np.array([7, 0, -1]))
    with pytest.raises(ValueError, match="outside"):
        net.evaluate(np.zeros((3, 12), np.float32), np.array([0, 9, 1]))


@pytest.mark.parametrize("change, field", [
    (dict(input_dim=0), "input_dim"),
    (dict(num_classes=1), "num_classes"),
    (dict(num_hidden_layers=-1), "num_hidden_layers"),
    (dict(nonlinearity="tanh"), "nonlinearity"),
    (dict(pnorm_input_dim=31), "pnorm_input_dim"),
    (dict(pnorm_output_dim=0), "pnorm_output_dim"),
    (dict(pnorm_p=0.5), "pnorm_p"),
    (dict(relu_dim=0), "relu_dim"),
    (dict(input_dim=12.5), "input_dim"),
])
def test_config_validation(change, field):
    with pytest.raises(ValueError, match=f"option {field}: must be"):
        Network(NetworkConfig(**{**SMALL, **change}))


def test_config_dict_round_trip():
    cfg = NetworkConfig(**SMALL, nonlinearity="pnorm", pnorm_p=math.inf)
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown key 'hidden'"):
        NetworkConfig.from_dict({**cfg.to_dict(), "hidden": 3})
    with pytest.raises(ValueError, match="missing required key 'num_classes'"):
        NetworkConfig.from_dict({"input_dim": 3})
    with pytest.raises(ValueError, match="pnorm_p"):
        NetworkConfig.from_dict({**cfg.to_dict(), "pnorm_p": 0})


def test_zero_hidden_layers_is_softmax_regression():
    net = Network(NetworkConfig(input_dim=5, num_classes=3, num_hidden_layers=0), seed=0)
    assert len(net.affine_layers) == 1 and net.affine_layers[0].linear.shape == (3, 5)
    X, labels = random_batch(net, 4, 0)
    net.train_gradients(X, labels)
    G = net.affine_layers[0].out_deriv
    np.testing.assert_allclose(G, np.eye(3)[labels] - 1 / 3, rtol=1e-6)


# ----------------------------------------------------------------------------- recipe pieces

def test_gradient_through_the_output_scale_matches_finite_differences():
    from ngsgd_mpi.network import presoftmax_prior_scale

    cfg = NetworkConfig(**{**SMALL, "num_hidden_layers": 1})
    rng = np.random.default_rng(3)
    params = rng.standard_normal(cfg.num_params())
    net = Network(cfg, params=params, dtype=np.float64)
    net.set_output_scale(presoftmax_prior_scale(rng.integers(0, 50, cfg.num_classes), -0.25))
    X, labels = random_batch(net, 5, 4)
    net.train_gradients(X, labels)
    analytic = flat_gradient(net)
    numeric = np.zeros_like(params)
    for i in range(params.size):
        orig = params[i]
        params[i] = orig + 1e-6
        plus = net.evaluate(X, labels)[0]
        params[i] = orig - 1e-6
        numeric[i] = (plus - net.evaluate(X, labels)[0]) / 2e-6
        params[i] = orig
    assert np.linalg.norm(analytic - numeric) <= 1e-6 * np.linalg.norm(numeric)
    # the scale multiplies the logits: the same as scaling the final layer's rows
    scaled = params.copy()
    _, start, _ = net.layer_param_slices()[-2]
    final = scaled[start:].copy()
    s = net.output_scale.scales
    A = final[:cfg.num_classes * 10].reshape(cfg.num_classes, 10) * s[:, None]
    scaled[start:] = np.concatenate([A.ravel(), final[cfg.num_classes * 10:] * s])
    np.testing.assert_allclose(Network(cfg, params=scaled, dtype=np.float64).log_probs(X),
                               net.log_probs(X), rtol=1e-12)
    net.set_output_scale(np.ones(cfg.num_classes))                  # replaces, not stacks
    assert sum(layer is net.output_scale for layer in net.layers) == 1 and len(net.layers) == 6


def test_presoftmax_prior_scale_is_kaldis_awk_formula():
    from ngsgd_mpi.network import presoftmax_prior_scale

    counts = np.array([1000, 10, 0, 390, 600])
    total = counts.sum()                                   # awk: ave = int(2000 / 5) = 400
    smoothed = (counts + 0.01 * 400) / (total + 0.01 * 400 * 5)
    expected = smoothed ** -0.25 / np.mean(smoothed ** -0.25)
    np.testing.assert_allclose(presoftmax_prior_scale(counts, -0.25), expected, rtol=1e-12)
    assert presoftmax_prior_scale(counts, -0.25).mean() == pytest.approx(1.0)
    assert np.all(np.isfinite(presoftmax_prior_scale([0, 0, 1], -0.25)))   # fewer frames than classes


def test_insert_hidden_layer_is_nnet_insert():
    from ngsgd_mpi.network import insert_hidden_layer

    cfg = NetworkConfig(**{**SMALL, "num_hidden_layers": 1, "num_classes": 50, "pnorm_output_dim": 10})
    net = Network(cfg, seed=2)
    net.set_input_transform(np.eye(12) * 2, np.ones(12))
    net.set_output_scale(np.linspace(0.5, 1.5, 50))
    grown = insert_hidden_layer(net, seed=[0, 7])
    assert grown.config == cfg.replace(num_hidden_layers=2) and not np.shares_memory(grown.params, net.params)
    old = net.layer_param_slices()
    np.testing.assert_array_equal(grown.params[:old[2][1]], net.params[:old[2][1]])   # layer 0 kept
    A1 = grown.affine_layers[1].linear
    assert A1.shape == (30, 10) and np.std(A1) == pytest.approx(1 / math.sqrt(30), rel=0.15)
    assert np.std(grown.affine_layers[1].bias) == pytest.approx(0.5, rel=0.3)
    final = grown.affine_layers[2]
    assert np.std(final.linear) == pytest.approx(0.1 / math.sqrt(10), rel=0.1)      # re-randomised
    assert np.std(final.bias) == pytest.approx(0.1 / math.sqrt(10), rel=0.3)
    assert grown.input_transform is net.input_transform
    np.testing.assert_array_equal(grown.output_scale.scales, net.output_scale.scales)
    assert grown.layers[-2] is grown.output_scale and len(grown.layers) == 9
    again = insert_hidden_layer(net, seed=[0, 7])
    np.testing.assert_array_equal(again.params, grown.params)                        # seeded
    X, labels = random_batch(grown, 4, 1)
    assert np.isfinite(grown.train_gradients(X, labels)[0])
