"""A synthetic BraTS-like dataset: real NIfTI files with known ground truth.

Generative model (one case, all in voxel units at 1 mm):

1. Geometry. A smooth random displacement field (Gaussian noise on a coarse
   grid, cubic upsampling) warps the coordinates, so each case's anatomy is
   a different smooth deformation of one template. The template is
   skull-stripped like BraTS (zero outside the brain): an ellipsoidal brain,
   a rim of subarachnoid CSF, a folded cortical grey-matter band (a finer
   noise field makes gyri and CSF-filled sulci), white matter inside, two
   deep grey nuclei and two lateral ventricles (CSF).
2. Tumour. A centre inside one hemisphere; the edema is a noisy blob of
   random radius. The tumour core is a smaller noisy blob whose centre lies
   near the edema's centre and whose radius is a random fraction of the
   edema's (so the core's position and size correlate with the edema, and a
   model can partly infer TC from FLAIR alone). Inside the core an inner
   necrotic part and an enhancing rim; about one case in ten has no
   enhancement (a low-grade-like case with an empty ET).
3. Contrast. Each tissue class has a relative intensity per modality
   following MRI physics (table `CONTRAST`): the enhancing rim is bright only
   in T1ce; edema is bright in FLAIR and T2; CSF is bright in T2 and dark in
   FLAIR; necrosis is dark in T1 and T1ce. Each case jitters every entry by a
   few percent and applies a scanner gain per modality.
4. Acquisition. Partial-volume blur (Gaussian), a smooth multiplicative bias
   field per modality, Rician noise, then int16 scaling; the background
   stays exactly 0.

Deterministic per (seed, case index). Files follow a release's layout,
names and label convention (`brats2020`: labels 0/1/2/4, uint8 seg;
`brats2023`: labels 0/1/2/3, float32 seg as in the real release).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

from jaxbrats import files
from jaxbrats.errors import JaxbratsError, require
from jaxbrats.labels import EDEMA, ENHANCING, NECROSIS, from_internal

# Tissue classes of the phantom (before the tumour labels are mapped to internal labels).
BG, CSF, GM, WM, ED, NEC, ET = range(7)
#: Relative intensity of each tissue class (BG, CSF, GM, WM, edema, necrosis, enhancing).
CONTRAST = {
    "flair": (0.0, 0.15, 0.80, 0.60, 1.35, 0.90, 1.25),
    "t1ce": (0.0, 0.25, 0.65, 0.90, 0.55, 0.25, 1.55),
    "t1": (0.0, 0.25, 0.65, 0.90, 0.55, 0.30, 0.60),
    "t2": (0.0, 1.60, 0.85, 0.55, 1.25, 1.45, 1.10),
}
PHANTOM_LAYOUTS = {
    # layout: (case folder pattern, file token per modality, label convention, seg dtype)
    "brats2020": (
        "BraTS20_Training_{i:03d}",
        "_",
        {"flair": "flair", "t1ce": "t1ce", "t1": "t1", "t2": "t2"},
        "brats2018",
        np.uint8,
    ),
    "brats2023": (
        "BraTS-GLI-{i:05d}-000",
        "-",
        {"flair": "t2f", "t1ce": "t1c", "t1": "t1n", "t2": "t2w"},
        "brats2023",
        np.float32,
    ),
}


def _smooth_noise(shape, rng, cells: int) -> np.ndarray:
    """A smooth random field of about unit scale with `cells` variations per axis.

    Gaussian noise on a coarse grid, interpolated with Gaussian radial weights
    one axis at a time (three small matrix products: fast at any size).
    """
    coarse = rng.standard_normal([cells + 2] * 3).astype(np.float32)
    weights = []
    for size in shape:
        x = np.linspace(-1, cells, size, dtype=np.float32)[:, None] - np.arange(-1, cells + 1, dtype=np.float32)[None]
        w = np.exp(-(x**2))
        weights.append(w / w.sum(axis=1, keepdims=True))
    field = np.einsum("ia,jb,kc,abc->ijk", *weights, coarse, optimize=True)
    return field / max(float(field.std()), 1e-6)


def _radius(coords, centre, radii) -> np.ndarray:
    return np.sqrt(sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)))


def _blob(coords, centre, radii, noise) -> np.ndarray:
    """Normalised distance to an irregular blob: < 1 inside.

    The noise is zeroed at the centre, so the blob keeps its nominal size.
    """
    index = tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre, noise.shape))
    return _radius(coords, centre, radii) + noise - noise[index]


def phantom_case(shape, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One synthetic case: float32 images per modality and internal labels (uint8)."""
    shape = tuple(int(s) for s in shape)
    size = np.array(shape, dtype=np.float32)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    warp = [g + 0.03 * s * _smooth_noise(shape, rng, 3) for g, s in zip(grid, size)]
    centre = size / 2 + rng.uniform(-0.02, 0.02, 3) * size
    brain_r = size * np.array([0.40, 0.44, 0.42]) * rng.uniform(0.93, 1.05, 3)
    rho = _radius(warp, centre, brain_r)

    tissue = np.full(shape, BG, dtype=np.uint8)
    folds = _smooth_noise(shape, rng, 10)
    tissue[rho < 1.0] = CSF
    tissue[rho < 0.95 + 0.015 * folds] = GM
    tissue[(tissue == GM) & (folds > 0.55) & (rho > 0.83)] = CSF  # sulci
    tissue[rho < 0.80 + 0.06 * folds] = WM
    for side in (-1, 1):
        nucleus = _radius(warp, centre + brain_r * [0.2 * side, 0.0, -0.05], brain_r * [0.12, 0.15, 0.12])
        tissue[nucleus < 1] = GM
        ventricle = _radius(warp, centre + brain_r * [0.09 * side, 0.02, 0.12], brain_r * [0.07, 0.33, 0.13])
        tissue[ventricle < 1] = CSF

    # Tumour: edema blob, core blob near its centre, necrosis inside the core.
    side = rng.choice([-1, 1])
    t_centre = centre + brain_r * [side * rng.uniform(0.2, 0.45), rng.uniform(-0.4, 0.4), rng.uniform(-0.35, 0.4)]
    r_edema = rng.uniform(0.25, 0.45) * brain_r.min() * rng.uniform(0.85, 1.15, 3)
    r_core = r_edema * rng.uniform(0.45, 0.8)
    c_core = t_centre + rng.uniform(-0.15, 0.15, 3) * r_edema
    d_edema = _blob(warp, t_centre, r_edema, 0.3 * _smooth_noise(shape, rng, 6))
    d_core = _blob(warp, c_core, r_core, 0.2 * _smooth_noise(shape, rng, 6))
    necrotic = rng.uniform(0.2, 0.8)
    enhancing = rng.random() > 0.1
    in_brain = rho < 0.97
    tissue[(d_edema < 1) & in_brain] = ED
    core = (d_core < 1) & in_brain
    tissue[core] = ET if enhancing else NEC
    tissue[core & (d_core < necrotic)] = NEC

    labels = np.zeros(shape, dtype=np.uint8)
    labels[tissue == ED], labels[tissue == NEC], labels[tissue == ET] = EDEMA, NECROSIS, ENHANCING
    brain = tissue != BG
    images = {}
    for modality, contrast in CONTRAST.items():
        table = np.array(contrast, dtype=np.float32) * rng.uniform(0.95, 1.05, len(contrast)).astype(np.float32)
        image = ndimage.gaussian_filter(table[tissue], sigma=0.7)  # partial volume
        image *= np.exp(0.12 * _smooth_noise(shape, rng, 2))  # bias field
        noise = rng.standard_normal((2,) + shape).astype(np.float32) * 0.03
        image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)  # Rician
        gain = rng.uniform(600, 1200)
        images[modality] = np.where(brain, np.maximum(np.rint(image * gain), 1), 0).astype(np.float32)
    return images, labels


def brats_affine(shape) -> np.ndarray:
    """A BraTS-like affine: 1 mm voxels, LPS axes, as in the released files."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape[1] - 1
    return affine


def _nibabel():
    return require("nibabel", "writing phantom NIfTI cases")


def _write_case(out_dir: Path, index: int, shape, layout: str, seed: int) -> str:
    pattern, sep, tokens, convention, seg_dtype = PHANTOM_LAYOUTS[layout]
    case_id = pattern.format(i=index)
    nib = _nibabel()
    images, labels = phantom_case(shape, np.random.default_rng([seed, index]))
    affine = brats_affine(shape)
    partial = Path(files.mkdtemp(prefix=f".partial-{case_id}-", dir=out_dir))
    try:
        for modality, image in images.items():
            nib.save(
                nib.Nifti1Image(image.astype(np.int16), affine), partial / f"{case_id}{sep}{tokens[modality]}.nii.gz"
            )
        seg = from_internal(labels, convention).astype(seg_dtype)
        nib.save(nib.Nifti1Image(seg, affine), partial / f"{case_id}{sep}seg.nii.gz")
        final = out_dir / case_id
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return case_id


def write_phantom(
    out_dir, cases: int, shape=(96, 96, 96), layout: str = "brats2023", seed: int = 0, workers: int | None = None
) -> list[str]:
    """Write `cases` phantom cases as NIfTI files under `out_dir`; returns the case ids."""
    if layout not in PHANTOM_LAYOUTS:
        raise JaxbratsError(f"unknown phantom layout {layout!r}; expected one of {sorted(PHANTOM_LAYOUTS)}")
    if cases < 1 or len(shape) != 3 or min(shape) < 16:
        raise JaxbratsError(
            "phantom needs at least 1 case and a 3D shape of at least 16 per axis, "
            f"got {cases} cases, shape {tuple(shape)}"
        )
    _nibabel()  # here, not in a worker: one line for the user
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = min(workers or os.cpu_count() or 1, cases)
    args = [(out_dir, i, tuple(shape), layout, seed) for i in range(cases)]
    if workers == 1:
        return [_write_case(*a) for a in args]
    with cf.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_write_case, *zip(*args)))
