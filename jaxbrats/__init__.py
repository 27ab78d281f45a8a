"""jaxbrats: missing-modality brain tumour segmentation in JAX."""

__version__ = "0.1.0"
