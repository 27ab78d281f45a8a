"""Inference: a trained run applied to cases.

`trained` loads a run's predicting models, `windows` tiles a volume, `segment` is the one
segmentation of a case that evaluation and prediction share, `nifti` writes label maps in the
source geometry, and `predict` segments new cases or folders.
"""

from jaxbrats.faces import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "load_trained": "trained",
        "sliding_window": "windows",
        "SlidingWindowConfig": "windows",
        "pad_shape": "segment",
        "decode": "segment",
        "write_nifti": "nifti",
        "write_prediction": "nifti",
        "predict_case": "predict",
        "predict_folder": "predict",
    },
)
