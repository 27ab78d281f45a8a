"""Families: K models of one architecture stacked along a leading axis, mapped with `jax.vmap`.

Some methods train many models of one architecture side by side: RIRN-style dedicated students
(one U-Net per modality subset, 15 of them) and one discriminator per student. A family holds
them as ONE module whose every variable has a leading axis K (member i's stem kernel of a
U-Net family is `family.encoder.stem.kernel[i]`), and runs them with `jax.vmap`, never with a
Python loop:

- one program: the train step traces and compiles the architecture once, whatever K is (a loop
  unrolls K copies of the network into the program: compile time grows with K; K = 3 small
  U-Nets above compiled in 3.6-4.4 s vmapped, 4.7-7.6 s unrolled);
- vmapped convolutions: XLA sees one batched (grouped) convolution per layer instead of K small
  ones (feature_group_count = K), which keeps an accelerator busy when each member's batch is
  small. On XLA:CPU grouped convolutions are slower than K plain ones: on 2 shared cores, K = 3
  U-Nets (16/32 channels, 24^3, forward + gradient) took 2.0-3.4 s vmapped vs 1.7 s as a loop
  unrolled in one program with native convolutions, 0.47-0.52 s vs 0.13-0.25 s with depth2d
  (noisy, a busy machine); stacking is for the accelerator and for sharding;
- the leading axis is an ordinary array axis, so it can be sharded along a mesh axis (e.g.
  "model": `NamedSharding(mesh, P("model"))` on every variable) to place members on different
  devices without changing the code that maps them.

Members do not interact: nothing in `map_members` mixes slices of the leading axis, so for a
loss that sums per-member losses, sum_i L_i(member_i), the gradient with respect to member i's
parameters is the gradient of L_i alone, up to float rounding of the batched convolutions
(tests/test_family.py checks it). Averaging
instead of summing would scale every member's gradient by 1/K (which Adam mostly ignores, SGD
does not).

Member i of `stack(create, keys)` equals `create(nnx.Rngs(keys[i]))` bit for bit: a member's
initialisation depends on its own key only, not on K or on its slot.

API: `stack(create, keys)`, `size(family)`, `member(family, i)`, `map_members(fn, family, *args,
in_axes=0)`. A family is a plain module of the architecture with stacked variables: split,
merge, checkpoint and optimise it as any other model; call it only through `map_members`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbrats.config import FAMILY_MAPS


def stack(create: Callable[[nnx.Rngs], nnx.Module], keys: jax.Array) -> nnx.Module:
    """K members `create(nnx.Rngs(keys[i]))` as one module whose every variable has a leading axis K.

    `keys`: a (K, 2) uint32 array of PRNG keys (`jax.random.split(jax.random.PRNGKey(seed), K)`)
    or a (K,) array of typed keys. Implemented as `jax.vmap` of key -> the state of a fresh member
    (`nnx.split(create(...))[1]`: Params and every other nnx.Variable), merged with the graph
    definition of a member; works under `nnx.eval_shape(lambda: stack(create, keys))`, which gives
    the abstract family (ShapeDtypeStructs with the leading axis, e.g. a checkpoint restore
    template) without initialising anything.
    """
    keys = jnp.asarray(keys)
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if (typed and keys.ndim != 1) or (not typed and (keys.ndim != 2 or keys.shape[1] != 2 or keys.dtype != jnp.uint32)):
        raise ValueError(
            f"keys must be a (K, 2) uint32 array of PRNG keys (or (K,) typed keys), "
            f"got shape {keys.shape} dtype {keys.dtype}"
        )
    if keys.shape[0] < 1:
        raise ValueError("a family needs at least one member (keys is empty)")
    graphdefs = []

    def init(key):
        graphdef, state = nnx.split(create(nnx.Rngs(key)))
        graphdefs.append(graphdef)  # static: the structure, no arrays (traced once)
        return state

    state = jax.vmap(init)(keys)
    return nnx.merge(graphdefs[0], state)


def member_keys(root: jax.Array, ids) -> jax.Array:
    """One key per member from its id (a subset index, a modality index): `fold_in(root, id)`, so a
    member's initialisation (and dropout) does not depend on which siblings are trained with it."""
    return jnp.stack([jax.random.fold_in(root, i) for i in ids])


def _leaves(family: nnx.Module):
    leaves = jax.tree.leaves(nnx.state(family))
    if not leaves:
        raise ValueError("the module has no variables: not a family")
    return leaves


def size(family: nnx.Module) -> int:
    """K, the number of members (the leading axis of every variable)."""
    return int(_leaves(family)[0].shape[0])


def member(family: nnx.Module, i) -> nnx.Module:
    """Member `i` as a plain module of the architecture (a copy of its slices; `i` may be traced).

    Writing to the returned module does not write to the family.
    """
    graphdef, state = nnx.split(family)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def resolve_map(how: str) -> str:
    """ "auto": "unroll" on CPU, "vmap" on accelerators.

    XLA:CPU runs a vmapped convolution (a grouped convolution, feature_group_count = K) several
    times slower than K separate ones: one RIRN step at 64^3 with 4 students took 35.0 s vmapped
    against 11.3 s for 4 steps of 1 student (tools/bench_students.py, 2 cores); `lax.map` over
    the members was slower still (41.7 s for one student). Unrolled, the members are K copies of
    one traced function in the program (K times the compile time). On GPU and TPU the batched
    convolution is one kernel launch per layer for all members, and the vmapped axis is what the
    mesh's "model" axis splits.
    """
    if how not in FAMILY_MAPS:
        raise ValueError(f"family map must be one of {FAMILY_MAPS}, got {how!r}")
    if how == "auto":
        return "unroll" if jax.default_backend() == "cpu" else "vmap"
    return how


def _axes(in_axes, n: int) -> tuple:
    if isinstance(in_axes, tuple):
        if len(in_axes) != n:
            raise ValueError(f"in_axes has {len(in_axes)} entries for {n} arguments")
        return in_axes
    return (in_axes,) * n


def map_states(fn: Callable[..., Any], states, *args, in_axes=0, how: str = "vmap"):
    """`fn(member_states, *member_args)` over the leading axis K of `states` (a pytree of stacked
    variables, e.g. {"students": ..., "discriminators": ...}); outputs get a leading axis K.

    `in_axes` for `args` as in `jax.vmap` (0: each member its slice, None: shared). `how`:
    "vmap" (one batched computation; shardable along the leading axis), "unroll" (K calls of
    `fn` traced one after the other, outputs stacked; see `resolve_map`) or "auto". Both give
    the same numbers up to float rounding, and the same gradients per member.
    """
    arg_axes = _axes(in_axes, len(args))
    how = resolve_map(how)
    if how == "vmap":
        return jax.vmap(fn, in_axes=(0, *arg_axes))(states, *args)
    k = jax.tree.leaves(states)[0].shape[0]

    def take(tree, i):
        return jax.tree.map(lambda a: a[i], tree)

    outs = [fn(take(states, i), *[take(a, i) if ax == 0 else a for a, ax in zip(args, arg_axes)]) for i in range(k)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def map_members(fn: Callable[..., Any], family: nnx.Module, *args, in_axes=0, out_axes=0, how: str = "vmap"):
    """`fn(member_module, *args)` over the members; outputs get a leading axis K.

    `in_axes` applies to `args` as in `jax.vmap`: 0 gives each member its own slice of an
    argument's leading axis (which must be K), None gives every member the whole argument; one
    value for all arguments, or a tuple with one entry per argument. `fn` must not write to the
    module (e.g. batch statistics): the writes are dropped. Differentiable with respect to the
    family's variables (also when the family was merged from traced state inside
    `jax.value_and_grad`), usable inside `jax.jit`. `how`: see `map_states` (`out_axes` applies
    to "vmap" only).
    """
    graphdef, state = nnx.split(family)
    if resolve_map(how) == "vmap":
        arg_axes = _axes(in_axes, len(args))
        return jax.vmap(lambda s, *a: fn(nnx.merge(graphdef, s), *a), in_axes=(0, *arg_axes), out_axes=out_axes)(
            state, *args
        )
    return map_states(lambda s, *a: fn(nnx.merge(graphdef, s), *a), state, *args, in_axes=in_axes, how="unroll")
