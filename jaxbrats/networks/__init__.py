"""Networks, in JAX/Flax NNX only (the PyTorch references are in `jaxbrats.interop`).

`unet` is the 3D residual U-Net every method builds on (`layers`: its convolutions, halo exchange
across the "space" axis), `factory` builds it from a config, `family` stacks models of one
architecture and maps them (students, discriminators), `latent_encoder` is Mind the Gap's,
`discriminator` RIRN's and SMU-Net's, `acdis` ACDIS's encoders, AFEB, MFSB and fusion decoder.
"""

from jaxbrats.faces import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "UNet": "unet",
        "UNetConfig": "unet",
        "unet_config": "factory",
        "probabilities": "factory",
        "Conv3D": "layers",
        "Discriminator": "discriminator",
        "DiscriminatorConfig": "discriminator",
        "LatentEncoder": "latent_encoder",
        "LatentEncoderConfig": "latent_encoder",
    },
)
