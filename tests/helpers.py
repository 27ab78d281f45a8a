"""Small NIfTI cases for tests, made on the fly (no data lives in the repository)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from jaxbrats.data.phantom import brats_affine, phantom_case
from jaxbrats.labels import from_internal

SHAPE = (20, 22, 18)
TOKENS_2018 = {"flair": "flair", "t1ce": "t1ce", "t1": "t1", "t2": "t2"}
TOKENS_2023 = {"flair": "t2f", "t1ce": "t1c", "t1": "t1n", "t2": "t2w"}


def phantom_arrays(seed: int = 0, shape=SHAPE):
    return phantom_case(shape, np.random.default_rng(seed))


def save(path: Path, array: np.ndarray, affine=None, dtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = brats_affine(array.shape) if affine is None else affine
    nib.save(nib.Nifti1Image(array.astype(dtype or array.dtype), affine), path)
    return path


def write_case(
    case_dir: Path,
    case_id: str | None = None,
    sep: str = "_",
    tokens=TOKENS_2018,
    convention: str = "brats2018",
    seed: int = 0,
    skip=(),
    seg: bool = True,
    ext: str = ".nii.gz",
    shape=SHAPE,
) -> Path:
    """A BraTS-style case folder with files `<case_id><sep><token><ext>`."""
    case_id = case_id or case_dir.name
    images, labels = phantom_arrays(seed, shape)
    for modality, token in tokens.items():
        if modality not in skip:
            save(case_dir / f"{case_id}{sep}{token}{ext}", images[modality], dtype=np.int16)
    if seg:
        save(case_dir / f"{case_id}{sep}seg{ext}", from_internal(labels, convention), dtype=np.uint8)
    return case_dir


# --- dataset.json layouts (Medical Segmentation Decathlon, nnU-Net v2) and other label conventions ---------
# Written from the datasets' own descriptions, independently of jaxbrats.labels / jaxbrats.modalities.

#: Task01_BrainTumour's dataset.json: channel index -> name, label value -> name.
MSD_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
MSD_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
#: nnU-Net v2's BraTS conversion: channel index -> name, label name -> value.
NNUNET_CHANNELS = {"0": "FLAIR", "1": "T1", "2": "T1c", "3": "T2"}
NNUNET_LABELS = {"background": 0, "edema": 1, "non-enhancing": 2, "enhancing": 3}
#: Internal label (0 bg, 1 necrosis/non-enhancing, 2 edema, 3 enhancing) -> value in both datasets above.
EDEMA_FIRST_VALUES = {0: 0, 1: 2, 2: 1, 3: 3}
#: The channel names used in these tests -> the phantom's modality.
CHANNEL_MODALITY = {
    "flair": "flair",
    "t1w": "t1",
    "t1gd": "t1ce",
    "t1-gd": "t1ce",
    "t2w": "t2",
    "t1": "t1",
    "t1c": "t1ce",
    "t2": "t2",
}


def relabel(labels: np.ndarray, values: dict[int, int]) -> np.ndarray:
    """Internal phantom labels -> another convention's values (uint8)."""
    lut = np.zeros(max(values) + 1, np.uint8)
    for internal, value in values.items():
        lut[internal] = value
    return lut[labels]


def brats2013_seg(labels: np.ndarray) -> np.ndarray:
    """Phantom labels in the BraTS 2013-2016 values: core split into necrosis 1 and non-enhancing 3, ET 4."""
    seg = relabel(labels, {0: 0, 1: 1, 2: 2, 3: 4})
    core = np.argwhere(labels == 1)
    seg[tuple(core[::2].T)] = 3  # every other core voxel is non-enhancing tumour
    return seg


def _channel_arrays(images: dict, channel_names: dict) -> list[np.ndarray]:
    return [images[CHANNEL_MODALITY[channel_names[k].lower()]] for k in sorted(channel_names, key=int)]


def write_msd(
    root: Path,
    cases: int = 2,
    modality=None,
    labels=None,
    values=None,
    shape=SHAPE,
    test_cases: int = 0,
    lists: bool = True,
) -> Path:
    """A Decathlon Task01-style dataset: imagesTr/BRATS_XXX.nii.gz 4D, labelsTr/, imagesTs/, dataset.json.

    Case i uses the phantom of seed i (test cases follow the training ones).
    `lists=False` leaves out the "training"/"test" lists (the folders say).
    """
    modality, labels, values = modality or MSD_MODALITY, labels or MSD_LABELS, values or EDEMA_FIRST_VALUES
    training, test = [], []
    for i in range(cases + test_cases):
        images, internal = phantom_arrays(i, shape)
        name = f"BRATS_{i + 1:03d}.nii.gz"
        folder = "imagesTr" if i < cases else "imagesTs"
        save(
            root / folder / name,
            np.stack(_channel_arrays(images, modality), axis=-1),
            affine=brats_affine(shape),
            dtype=np.float32,
        )
        if i < cases:
            save(root / "labelsTr" / name, relabel(internal, values), dtype=np.uint8)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
    meta = {"name": "BRATS", "modality": modality, "labels": labels, "numTraining": cases, "numTest": test_cases}
    if lists:
        meta |= {"training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def write_nnunetv2(
    root: Path,
    cases: int = 2,
    channel_names=None,
    labels=None,
    values=None,
    shape=SHAPE,
    test_cases: int = 0,
    file_ending: str = ".nii.gz",
) -> Path:
    """An nnU-Net v2 raw dataset: imagesTr/BRATS_XXX_000C<ending> per channel, labelsTr/, imagesTs/, dataset.json."""
    channel_names, labels = channel_names or NNUNET_CHANNELS, labels or NNUNET_LABELS
    values = values or EDEMA_FIRST_VALUES
    for i in range(cases + test_cases):
        images, internal = phantom_arrays(i, shape)
        case = f"BRATS_{i + 1:03d}"
        folder = "imagesTr" if i < cases else "imagesTs"
        for c, array in enumerate(_channel_arrays(images, channel_names)):
            save(root / folder / f"{case}_{c:04d}{file_ending}", array, dtype=np.int16)
        if i < cases:
            save(root / "labelsTr" / f"{case}{file_ending}", relabel(internal, values), dtype=np.uint8)
    meta = {"channel_names": channel_names, "labels": labels, "numTraining": cases, "file_ending": file_ending}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def write_plain_case(case_dir: Path, seg_values: np.ndarray | None = None, seed: int = 0, shape=SHAPE) -> Path:
    """A plain-layout case folder (flair.nii.gz, t1ce.nii.gz, t1.nii.gz, t2.nii.gz, seg.nii.gz).

    `seg_values` is the seg to write (default: the phantom's labels in the 2018 values).
    """
    images, labels = phantom_arrays(seed, shape)
    for modality, image in images.items():
        save(case_dir / f"{modality}.nii.gz", image, dtype=np.int16)
    seg = relabel(labels, {0: 0, 1: 1, 2: 2, 3: 4}) if seg_values is None else seg_values
    save(case_dir / "seg.nii.gz", seg, dtype=np.uint8)
    return case_dir


def tensorboard_values(folder: Path):
    """(event, summary value) of every value in a folder's TensorBoard event files, in file order."""
    import struct

    from tensorboardX.proto import event_pb2

    for path in sorted(folder.glob("*tfevents*")):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecord: length (8), its CRC (4), the record, its CRC (4)
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 16 + length
            for value in event.summary.value:
                yield event, value


def synthetic_batch(seed: int, n: int = 2, size: int = 16) -> dict:
    """A batch with a tumour blob per sample (every tumour label present; a training batch of the
    pipeline's keys, for teacher/student tests) and some padding."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, size, size, size, 4)).astype(np.float32)
    label = np.zeros((n, size, size, size), np.uint8)
    for i in range(n):
        c = rng.integers(5, size - 5, 3)
        label[i, c[0] - 4 : c[0] + 4, c[1] - 4 : c[1] + 4, c[2] - 4 : c[2] + 4] = 2
        label[i, c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2] = 1
        label[i, c[0] - 1 : c[0] + 1, c[1] - 1 : c[1] + 1, c[2] : c[2] + 2] = 3
        image[i, label[i] > 0] += 2.0
    valid = np.ones((n, size, size, size), bool)
    valid[:, -2:] = False
    return {"image": image, "label": label, "valid": valid, "modality_mask": np.ones((n, 1, 4), bool)}


def assert_resume_is_bit_for_bit(method, stage: str, batches: list, checkpoint_dir) -> None:
    """Train `stage` on `batches` in one go, and again with a checkpoint saved and restored half way:
    the two final train states are equal bit for bit (one jitted step serves every run)."""
    import jax
    import orbax.checkpoint as ocp

    from jaxbrats import engine
    from jaxbrats.runtime.checkpoints import restore, save
    from jaxbrats.runtime.sharding import make_mesh, shard_state

    optimizers = engine.stage_optimizers(method, stage, 10)
    graphdefs, fresh = engine.init_state(method, stage, 0, optimizers)
    step = jax.jit(engine.make_train_step(method, stage, graphdefs, optimizers))

    def run(state, part):
        state = shard_state(state, make_mesh(), method.families(stage))
        for batch in part:
            state, _ = step(state, batch)
        return state

    half = len(batches) // 2
    uninterrupted = run(fresh, batches)
    manager = ocp.CheckpointManager(
        checkpoint_dir, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    )
    save(manager, run(fresh, batches[:half]), {"stage": stage})
    manager.wait_until_finished()
    _, abstract = engine.abstract_state(method, stage, optimizers)
    restored, _ = restore(manager, abstract)
    resumed = run(restored, batches[half:])
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)
