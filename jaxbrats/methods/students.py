"""Dedicated students: one network per modality subset, and a teacher that may come from another run.

RIRN and Mind the Gap both train a family of students (`networks.family`), student i serving the
modality subset `subsets[i]` and seeing only its modalities (the missing channels zero-filled).
What follows from that, the same for both, lives here so that neither method imports the other:

- `Students`: the subset of each slot and the slot of each subset (`student_slot`), the members'
  keys, the per-student mapping of a loss (`Students.map`), per-subset metric names
  ("t1ce/seg"), and prediction by the served subset's student;
- `discriminator_family` and `family_discriminator_loss`: one discriminator per student;
- a teacher from another run (`method.teacher_from`): `find_teacher_run` resolves a run's work
  directory or one of its checkpoints/<stage> folders, `restore_teacher` restores its U-Net.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbrats.config import Config
from jaxbrats.errors import ConfigError, JaxbratsError
from jaxbrats.losses.adversarial import discriminator_loss
from jaxbrats.modalities import SUBSET_MASKS, SUBSET_NAMES, SUBSETS, drop_modalities
from jaxbrats.networks import family
from jaxbrats.networks.discriminator import Discriminator, DiscriminatorConfig
from jaxbrats.networks.factory import probabilities
from jaxbrats.runtime.checkpoints import restore_model
from jaxbrats.runtime.rundir import RunDir


def student_slot(slots, subset, students, method: str):
    """(slot, served) of a dedicated method's student for the subset index `subset` (None: the full
    set): `slots` maps each of the 15 subsets to its student (-1: none). A subset no student
    serves is refused in one line when `subset` is known here (a Python or numpy int); inside a
    compiled program, where it is data, `served` is False and the caller returns NaN rather than
    another student's output."""
    subset = len(SUBSETS) - 1 if subset is None else subset
    if not isinstance(subset, jax.core.Tracer) and slots[int(subset)] < 0:
        raise JaxbratsError(
            f"{method} has no student for {SUBSET_NAMES[int(subset)]} "
            f"(its students: {', '.join(SUBSET_NAMES[s] for s in students)})"
        )
    slot = jnp.asarray(slots)[subset]
    return jnp.maximum(slot, 0), slot >= 0


class Students:
    """The students of a dedicated method: slot i of the family serves the subset `subsets[i]`."""

    def __init__(self, subsets, method: str):
        self.subsets = tuple(subsets)  # indices into `modalities.SUBSETS`, in slot order
        self.method = method  # names the method in a refusal
        self.slots = np.full(len(SUBSET_NAMES), -1, np.int32)  # subset index -> the student serving it (-1: none)
        self.slots[list(self.subsets)] = np.arange(len(self.subsets))

    def __len__(self) -> int:
        return len(self.subsets)

    def member_keys(self, root):
        """One key per student from its subset index (`family.member_keys`): a student starts the
        same whichever other students are trained with it."""
        return family.member_keys(root, self.subsets)

    def stack(self, create, root) -> nnx.Module:
        """A family of `create(rngs)`, one member per student."""
        return family.stack(create, self.member_keys(root))

    def map(self, fn, models, names, how: str):
        """`fn(members, mask, subset)` for every student: `members` the student's slice of each family
        in `names` ({name: module}), `mask` (4,) its modalities, `subset` its subset index; outputs
        stacked along a leading axis K (`family.map_states`: vmapped or unrolled, `how`)."""
        graphs = {n: nnx.split(models[n]) for n in names}

        def one(states, mask, subset):
            return fn({n: nnx.merge(graphs[n][0], s) for n, s in states.items()}, mask, subset)

        states = {n: s for n, (_, s) in graphs.items()}
        masks = jnp.asarray(SUBSET_MASKS[list(self.subsets)])
        return family.map_states(one, states, masks, jnp.asarray(self.subsets, jnp.int32), how=how)

    def named(self, values: dict, skip=()) -> dict:
        """Per-student values (each with a leading axis K) as metrics named "<subset>/<key>"."""
        out = {}
        for slot, s in enumerate(self.subsets):
            out.update({f"{SUBSET_NAMES[s]}/{k}": v[slot] for k, v in values.items() if k not in skip})
        return out

    def predict(self, students, image, modality_mask, subset, output: str):
        """Region probabilities of the student serving `subset` (data: its weights are picked inside the
        program), on its modalities; `output` is the students' convention ("regions" or "labels").

        A subset no student serves is refused: in one line when `subset` is known here (a Python or
        numpy int, or None for the full set); inside a compiled program, where it is data, the
        probabilities come out NaN rather than another student's."""
        slot, served = student_slot(self.slots, subset, self.subsets, self.method)
        student = family.member(students, slot)
        logits = student(drop_modalities(image, modality_mask))["logits"]
        return jnp.where(served, probabilities(output, logits), jnp.nan)


def discriminator_family(config: Config, students: Students, in_channels: int, width: int, root) -> nnx.Module:
    """One discriminator per student (`networks.discriminator`), stacked as a family."""
    disc = DiscriminatorConfig(
        in_channels=in_channels, width=width, dtype=config.model.dtype, conv_impl=config.model.conv_impl
    )
    return students.stack(lambda r: Discriminator(disc, r), root)


def family_discriminator_loss(discriminators, real, fake, real_per_member: bool, how: str):
    """Each student's discriminator on `real` (label 1; one array for all, or one per member with
    `real_per_member`) and its student's `fake` (label 0): ((K,) losses, their parts averaged)."""

    def one(disc, real, fake):
        return discriminator_loss(disc(real), disc(fake))

    in_axes = (0 if real_per_member else None, 0)
    losses, parts = family.map_members(one, discriminators, real, fake, in_axes=in_axes, how=how)
    return losses, {k: jnp.mean(v) for k, v in parts.items()}


# --- a teacher from another run (`method.teacher_from`) -------------------------------------------

TEACHER_FROM = "method.teacher_from"  # the config key every refusal below names
#: The runs a `teacher_from` U-Net may come from: method -> (model name, output convention or None: the
#: run's `method.output`).
TEACHER_RUNS = {"baseline": ("unet", None), "rirn": ("teacher", "regions")}
#: [model] keys that make two U-Nets the same network (the rest are how it is computed).
ARCHITECTURE_KEYS = ("widths", "blocks", "groups", "upsample")


@dataclasses.dataclass(frozen=True)
class TeacherRun:
    """Where a `teacher_from` U-Net comes from."""

    checkpoints: Path  # the stage folder to restore from
    model: str  # its model name there ("unet", "teacher")
    output: str  # "regions" (sigmoid WT/TC/ET) | "labels" (softmax over the internal labels)
    deep_supervision: bool


def named_run(path) -> tuple[RunDir, str | None]:
    """The run `path` names and the stage it names: a run's work directory (stage None) or one of its
    checkpoints/<stage> folders (that stage). One line if neither."""
    path = Path(path).expanduser()
    if RunDir(path).is_run():
        return RunDir(path), None
    run = RunDir.of_checkpoints(path)
    if run is None:
        raise ConfigError(
            f"{TEACHER_FROM}: {path} is neither a run's work directory (with config.json) "
            "nor its checkpoints/<stage> folder"
        )
    return run, path.name


def find_teacher_run(path, config: Config) -> TeacherRun:
    """The U-Net `path` names (`named_run`; a work directory: its last stage with checkpoints), which
    must be the plain U-Net of a `TEACHER_RUNS` run built like `config`'s. One line if not."""
    from jaxbrats.methods import get_method, load_config  # the registry (no import of another method)

    run, stage = named_run(path)
    try:
        other = load_config(run.config)
    except ConfigError as e:
        raise ConfigError(f"{TEACHER_FROM}: {run.config} cannot be read: {e}") from None
    if other.method_name not in TEACHER_RUNS:
        raise ConfigError(
            f"{TEACHER_FROM}: {run.root} is a run of method {other.method_name}; the teacher must be the plain "
            f"U-Net of a {' or '.join(TEACHER_RUNS)} run"
        )
    model, output = TEACHER_RUNS[other.method_name]
    method = get_method(other.method_name)
    options = method.parse_options(other)
    check_same_unet(run, other, config)
    stage = stage or last_stage_with_checkpoints(run, method.stages)
    deep = bool(getattr(options, "deep_supervision", False))
    return TeacherRun(run.checkpoints(stage), model, output or options.output, deep)


def check_same_unet(run: RunDir, other: Config, config: Config) -> None:
    """The other run's U-Net is this run's network (the KD terms compare the two networks' features)."""
    differs = [k for k in ARCHITECTURE_KEYS if getattr(other.model, k) != getattr(config.model, k)]
    if differs:
        k = differs[0]
        raise ConfigError(
            f"{TEACHER_FROM}: {run.root}'s U-Net has model.{k} = {getattr(other.model, k)!r}, this run's "
            f"{getattr(config.model, k)!r} (the KD terms compare the two networks' features)"
        )


def last_stage_with_checkpoints(run: RunDir, stages) -> str:
    """The last of `stages` (in their order) that has a checkpoint folder in `run`."""
    found = [s for s in reversed(stages) if run.checkpoints(s).is_dir()]
    if not found:
        raise ConfigError(f"{TEACHER_FROM}: {run.root} has no checkpoints (train it first)")
    return found[0]


def restore_teacher(checkpoints, names: tuple[str, ...], abstract) -> nnx.State:
    """The first model of `names` in the newest checkpoint of the folder `checkpoints`, in the shapes
    of `abstract` (this run's teacher); one line naming `method.teacher_from` if none fits."""
    return restore_model(checkpoints, names, abstract, TEACHER_FROM)
