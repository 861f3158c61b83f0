"""Run in the torch venv (tests/test_hpacellseg.py), in a process of its own after checks.py: segment the
planted image through the offline folder that checks.py built, with nothing of the stand-in on sys.path
(as on Kaggle: the code comes from the folder). Prints one JSON object. argv[1]: checks.py's scratch folder."""

import json
import sys
import warnings
from pathlib import Path

import numpy as np

here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # a script's folder comes first: not here
scratch = Path(sys.argv[1])
red, blue, truth = np.load(scratch / "planted.npy")
from hpa_nb.segmentation.backends import segment  # noqa: E402

seen = {"importable_before": any((Path(p) / "hpacellseg").is_dir() for p in sys.path if p)}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    labels = segment(
        red, blue, red, method="hpacellseg", hpacellseg_dir=str(scratch / "offline"), device="cpu", scale_factor=0.5
    )
seen["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:80]}" for w in caught})
import hpacellseg  # noqa: E402

seen["package_from"] = str(Path(hpacellseg.__file__).parent.parent)
seen["labels_shape"] = list(labels.shape)
seen["ious"] = [
    float(
        np.sum((labels == np.bincount(labels[truth == k]).argmax()) & (truth == k))
        / np.sum((labels == np.bincount(labels[truth == k]).argmax()) | (truth == k))
    )
    for k in (1, 2)
]
print(json.dumps(seen))
