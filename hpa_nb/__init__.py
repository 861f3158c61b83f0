"""hpa_nb: a notebook-first toolkit for the HPA Single Cell Classification competition.

Eight stage folders, each importing only the ones before it: core → segmentation → data → sample → plots →
training → cells → kaggle; `hpa_nb.cli` and `hpa_nb.bench` sit above them all. Each folder's ``__init__`` says
what lives there.

Importing the package first picks the Keras backend (JAX on a TPU VM such as Kaggle's v5e-8),
so ``import hpa_nb`` belongs before ``import keras``.
"""

import os as _os

# TensorFlow's C++ INFO/WARNING lines would otherwise fill every notebook cell that touches tf.data.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from hpa_nb.core.env import select_backend as _select_backend  # noqa: E402

_select_backend()

from hpa_nb.core import log as _log  # noqa: E402
from hpa_nb.core.labels import LABEL_NAMES, N_CLASSES  # noqa: E402

_log.setup()  # the package's lines on standard error, quieter with hpa_nb.core.log.setup("quiet")

__all__ = ["LABEL_NAMES", "N_CLASSES"]
__version__ = "0.1.0"
