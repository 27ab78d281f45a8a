"""Data: from a folder of NIfTI cases to batches on the device.

`discovery` finds cases in any supported layout, `loading` reads them into RAS+ and the internal
labels, `preprocess` crops and normalises them into the `cache` (`CacheDataset`), `splits` divides
them, `pipeline` is the Grain loader (random crops, augmentation, modality dropout), `phantom`
writes synthetic cases, and `transforms` holds M3AE's patch and window geometry.
"""

from jaxbrats.faces import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "discover": "discovery",
        "CaseRecord": "discovery",
        "load_case": "loading",
        "LoadedCase": "loading",
        "prepare_dataset": "preprocess",
        "check_dataset": "preprocess",
        "preprocess_case": "preprocess",
        "CacheDataset": "cache",
        "ratio_split": "splits",
        "kfold_split": "splits",
        "read_split_file": "splits",
        "PipelineConfig": "pipeline",
        "make_loader": "pipeline",
        "box_start": "pipeline",
        "write_phantom": "phantom",
    },
)
