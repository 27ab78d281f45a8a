"""PyTorch interop: reference networks, the M3AE weight importer and the step-time benchmark.

`torch_unet` is the PyTorch twin of `networks.unet` (same weights, same outputs), `torch_m3ae` the
public M3AE network, `m3ae_import` turns its checkpoint into a jaxbrats run, and `benchmark`
times a step in both frameworks (`jaxbrats bench`). torch is imported only when used.
"""

from jaxbrats.faces import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "import_m3ae": "m3ae_import",
        "TorchUNet": "torch_unet",
        "torch_state_dict": "torch_unet",
    },
)
