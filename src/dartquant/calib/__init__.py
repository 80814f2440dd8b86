"""Local calibration of rotation matrices (DartQuant).

Each rotation R is fitted on its own, from stored calibration activations x,
so that the rotated activations o = x R are easy to quantize (flat, small
range).  Nothing here needs the model: only activations go in and an
orthogonal matrix comes out.

- :mod:`.losses`: the Whip loss and the ablation losses (quantization error,
  variance, kurtosis).
- :mod:`.orth`: ways to keep R orthogonal while optimizing it: the QR-Orth
  parametrization (DartQuant) and Cayley SGD on the Stiefel manifold
  (SpinQuant's optimizer).
- :mod:`.train`: the minibatch training loop, :func:`.train.train_rotation`.
"""

from .losses import LOSSES, kurtosis_loss, quant_error_loss, variance_loss, whip_loss
from .orth import CayleyOrth, CayleySGD, QROrth, orthogonality_error, qr_orthogonal
from .train import RotationTrainConfig, train_rotation

__all__ = [
    "LOSSES",
    "whip_loss",
    "quant_error_loss",
    "variance_loss",
    "kurtosis_loss",
    "QROrth",
    "CayleyOrth",
    "CayleySGD",
    "qr_orthogonal",
    "orthogonality_error",
    "RotationTrainConfig",
    "train_rotation",
]
