"""The models' initialisation, compiled as one program, draws the values of the op-by-op one."""

import jax
import numpy as np
from flax import nnx

from jaxbrats.engine.state import init_models
from jaxbrats.methods import get_method, load_config

TINY = ["model.widths=[8,16,16]", "model.blocks=[1,1,1]", "data.crop_size=[16,16,16]"]


def test_compiled_init_equals_op_by_op():
    """M3AE's fine-tuning: a U-Net and the learned substitute image, two models from one Rngs."""
    name, stage = "m3ae", "finetune"
    method = get_method(name)(load_config(None, [f"method.name='{name}'", *TINY, "method.substitute_shape=[12,10,8]"]))
    graphdefs, states = init_models(method, stage, seed=3, compiled=True)
    eager = {n: nnx.split(m) for n, m in method.init_models(stage, nnx.Rngs(3)).items()}
    assert graphdefs == {n: g for n, (g, _) in eager.items()}
    compiled, reference = jax.tree.leaves(states), jax.tree.leaves({n: s for n, (_, s) in eager.items()})
    assert len(compiled) == len(reference) > 0
    for a, b in zip(compiled, reference):
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        # Equal up to float rounding (XLA:CPU compiles the program unoptimised: a last bit may differ).
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    other = jax.tree.leaves(init_models(method, stage, seed=4, compiled=True)[1])
    assert any(not np.allclose(a, b) for a, b in zip(other, compiled) if a.dtype.kind == "f" and a.size > 1)
