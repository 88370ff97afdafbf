"""costs.py: the multiply-add model shared by the updaters and the benchmarks."""

import pytest

from ngsgd_mpi import costs
from ngsgd_mpi.network import NetworkConfig

PAPER = NetworkConfig(input_dim=360, num_classes=2000).affine_shapes()


def test_sgd_macs_paper_size():
    # 360 -> 3000, 2 x 300 -> 3000, 300 -> 2000 at N = 512: forward + weight gradient
    # everywhere, input derivative for all but the first layer.
    assert costs.sgd_macs(PAPER, 512) == 512 * (2 * 360 * 3000 + 3 * 2 * 300 * 3000 + 3 * 300 * 2000)


def test_online_floor_ratios_paper_size():
    sgd = costs.sgd_macs(PAPER, 512)
    formed = 1 + costs.online_extra_macs(PAPER, 512, 20, 80, 4, output_form="formed") / sgd
    auto = 1 + costs.online_extra_macs(PAPER, 512, 20, 80, 4) / sgd
    assert 1.22 < formed < 1.23          # the "about 22 %" for the straightforward form
    assert 1.20 < auto < 1.21            # every paper layer's output side is factored
    assert auto == 1 + costs.online_extra_macs(PAPER, 512, 20, 80, 4, output_form="factored") / sgd
    with pytest.raises(ValueError, match="output_form"):
        costs.online_extra_macs(PAPER, 512, 20, 80, 4, output_form="materialized")


def test_factored_choice_and_its_margin():
    assert costs.FACTORED_MARGIN == 0.85
    # (D_in + 1)(D_out + N) < 0.85 N D_out
    assert costs.use_factored_output(512, 300, 3000, 80)
    assert not costs.use_factored_output(256, 100, 50, 80)
    assert not costs.use_factored_output(128, 100, 1000, 80)   # 101 x 1128 > 0.85 x 128 x 1000
    assert not costs.use_factored_output(512, 300, 1, 80)      # D_out = 1: no low-rank part


def test_simple_model():
    assert costs.simple_output_formed(512, 300, 300) and not costs.simple_output_formed(512, 300, 3000)
    assert costs.simple_output_formed(4096, 300, 3000)         # N >= D: the D x D form
    sgd = costs.sgd_macs(PAPER, 512)
    assert 1.4 < 1 + costs.simple_extra_macs(PAPER, 512) / sgd < 1.6
    assert costs.simple_side_macs(1, 10) == 0
