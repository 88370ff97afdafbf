"""ngsgd_mpi: natural-gradient SGD with MPI parameter averaging (Povey, Zhang & Khudanpur 2014).

The engine is importable without MPI or HDF5::

    from ngsgd_mpi import OnlineNaturalGradient, precondition_simple
    ng = OnlineNaturalGradient(rank=20)            # nnet2 semantics, update_period 4, alpha 4
    X_hat, gamma = ng.precondition(X)              # X: N x D float32/float64; use gamma * X_hat

    from ngsgd_mpi import Network, NetworkConfig, OptimizerConfig, make_updater
"""

from .network import Network, NetworkConfig
from .ng_online import OnlineNaturalGradient, OnlineNGState
from .ng_simple import precondition_simple, precondition_simple_unscaled
from .optim import OptimizerConfig, make_updater

__version__ = "0.1.0"

__all__ = ["OnlineNaturalGradient", "OnlineNGState", "precondition_simple",
           "precondition_simple_unscaled", "Network", "NetworkConfig", "OptimizerConfig",
           "make_updater", "__version__"]
