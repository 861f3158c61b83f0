"""hpa_nb: a notebook-first toolkit for the HPA Single Cell Classification competition.

Importing the package first picks the Keras backend (JAX on a TPU VM where TensorFlow
cannot see the TPU), so ``import hpa_nb`` belongs before ``import keras``.
"""
from hpa_nb.env import select_backend as _select_backend

_select_backend()

from hpa_nb.labels import LABEL_NAMES, N_CLASSES  # noqa: E402

__all__ = ["LABEL_NAMES", "N_CLASSES"]
__version__ = "0.1.0"
