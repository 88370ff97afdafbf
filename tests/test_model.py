import numpy as np
import pytest

from ngsgd_mpi import storage
from ngsgd_mpi.kaldi.pipeline import Cmvn, InputPipeline
from ngsgd_mpi.model import MODEL_FORMAT, Model, ModelError
from ngsgd_mpi.network import NetworkConfig

NET = NetworkConfig(input_dim=15, num_classes=2, num_hidden_layers=1, pnorm_input_dim=6, pnorm_output_dim=3)


def model(**changes):
    params = np.arange(NET.num_params(), dtype=np.float32) / 100
    fields = dict(network_config=NET, params=params, context=2, input_mean=np.ones(15),
                  input_std=np.full(15, 2.0), class_counts=np.array([1.0, 3.0]),
                  train_config={"lr_initial": 0.1}, info={"period": 4},
                  posterior_priors=np.array([0.4, 0.6]), input_pipeline=InputPipeline(Cmvn(True, True), "pdf"))
    fields.update(changes)
    return Model(**fields)


def test_model_round_trip(tmp_path):
    path = str(tmp_path / "m.h5")
    model().save(path)
    back = Model.load(path)
    np.testing.assert_array_equal(back.params, model().params)
    np.testing.assert_allclose(back.class_priors, [0.25, 0.75])
    assert back.network_config == NET and back.context == 2 and back.feat_dim == 3
    assert back.train_config == {"lr_initial": 0.1} and back.info == {"period": 4}
    np.testing.assert_array_equal(back.posterior_priors, [0.4, 0.6])
    assert back.input_pipeline == InputPipeline(Cmvn(norm_means=True, norm_vars=True), targets="pdf")
    net = back.network()
    assert net.input_transform is not None
    np.testing.assert_array_equal(net.params, back.params)


@pytest.mark.parametrize("record_change, meta_change, match", [
    ({"params": np.ones(3, np.float32)}, {}, "'params' must be"),
    ({"params": np.zeros(NET.num_params(), np.float64)}, {}, "'params' must be"),
    ({"input_std": np.zeros(15, np.float32)}, {}, "positive deviations"),
    ({"class_counts": np.ones(3)}, {}, "class_counts must be"),
    ({}, {"context": 3}, "context 3 does not divide input_dim 15"),
    ({}, {"network_config": {"input_dim": 15}}, "bad or missing network_config"),
    ({"posterior_priors": np.array([0.5, 0.6])}, {}, "posterior_priors must be"),
    ({"posterior_priors": np.array([0.5, 0.5, 0.0])}, {}, "posterior_priors must be"),
    ({"posterior_priors": np.array([np.nan, 1.0])}, {}, "posterior_priors must be"),
    ({}, {"input_pipeline": {"cmvn": None}}, "input_pipeline: not an input-pipeline record"),
    ({}, {"input_pipeline": {"format": "ngsgd_mpi.input-pipeline", "cmvn": {"norm_means": False,
                                                                            "norm_vars": True},
                             "targets": "pdf"}}, "norm_vars needs norm_means"),
    ({}, {"input_pipeline": {"format": "ngsgd_mpi.input-pipeline", "cmvn": None, "targets": "words"}},
     "'targets' must be one of"),
])
def test_inconsistent_model_files_are_refused(tmp_path, record_change, meta_change, match):
    path = str(tmp_path / "m.h5")
    model().save(path)
    record, meta = storage.read(path, MODEL_FORMAT)
    storage.write(path, MODEL_FORMAT, {**record, **record_change}, {**meta, **meta_change})
    with pytest.raises(ModelError, match=match):
        Model.load(path)


def test_a_model_without_priors_or_pipeline_loads(tmp_path):
    path = str(tmp_path / "m.h5")
    model(posterior_priors=None, input_pipeline=None).save(path)
    back = Model.load(path)
    assert back.posterior_priors is None and back.input_pipeline is None


def test_recipe_fixed_layers_round_trip_and_are_checked(tmp_path):
    """The LDA-like input transform and the pre-softmax prior scale travel with the model."""
    path = str(tmp_path / "m.h5")
    matrix, bias = np.eye(15) * 2.0, np.arange(15.0)
    model(input_mean=None, input_std=None, input_transform=(matrix, bias),
          output_scale=np.array([0.5, 1.5])).save(path)
    back = Model.load(path)
    np.testing.assert_array_equal(back.input_transform[0], matrix)
    np.testing.assert_array_equal(back.output_scale, [0.5, 1.5])
    net = back.network()
    np.testing.assert_array_equal(net.input_transform.bias, bias)
    assert net.layers[-2] is net.output_scale
    record, meta = storage.read(path, MODEL_FORMAT)
    for change, match in (({"output_scale": np.array([1.0, -1.0], np.float32)}, "output_scale must be"),
                          ({"input_transform_bias": np.ones(3, np.float32)}, "input_transform_matrix")):
        storage.write(path, MODEL_FORMAT, {**record, **change}, meta)
        with pytest.raises(ModelError, match=match):
            Model.load(path)
