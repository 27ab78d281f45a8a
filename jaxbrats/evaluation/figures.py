"""Case figures of an evaluation: three orthogonal slices, the images, the truth and the predictions.

`jaxbrats eval --figures N` writes, for the first N cases evaluated,
``<out>/figures/<case_id>.png`` and the same image to TensorBoard
(``<out>/tensorboard/``, tag ``figures/<case_id>``, `log_figures`).

A figure is a grid. Rows: the axial, coronal and sagittal slices through one
voxel, the centre of the bounding box of the ground-truth tumour (any label
> 0), or the centre of the volume when the case has no tumour (our choice:
the middle of the tumour's extent shows it on every row; `slice_centre`).
Columns: FLAIR and T1ce in grey (each windowed to its 0.5-99.5th
percentiles over the brain; black outside it, where every channel is 0),
then overlays on FLAIR of the ground truth and of the predictions of the full
subset and of each single modality (flair, t1ce, t1, t2), only the subsets
the method serves and the case can be scored on (the evaluation's
``allowed``), each titled with its name and that case's Dice WT / TC / ET in
percent.

Colours (BraTS figures'): edema (ED, SNFH) green, necrosis / non-enhancing core
(NCR/NET) red, enhancing tumour (ET) yellow, blended with the grey FLAIR at
`ALPHA` (`overlay`), with a legend.

Orientation: the cache is RAS+ (array axes 0, 1, 2 run towards the subject's
right, anterior and superior; `data.loading.to_canonical`). Slices are shown
the radiological way (`display`): anterior up in the axial view, superior up
in the coronal and sagittal views, the subject's right on the image's left
(axial, coronal) and anterior on the left (sagittal), as clinical viewers do.
Voxel sizes set each panel's aspect ratio.

Size: fixed, so figures of one evaluation line up: `DPI` 100, a panel cell of
`PANEL` = 200 px square, margins `LEFT`, `TOP`, `BOTTOM`; a figure of C
columns is ``LEFT + 200 C`` = ``24 + 200 C`` px wide and ``TOP + 3 * 200 +
BOTTOM`` = 700 px high (`figure_size`); 8 columns: 1624 x 700.
Files are written atomically (`files.write_atomic`: a temporary file in the folder, then a rename).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxbrats import files
from jaxbrats.errors import require
from jaxbrats.labels import EDEMA, ENHANCING, NECROSIS, REGIONS
from jaxbrats.modalities import FULL_SUBSET_INDEX, MODALITIES, SUBSET_NAMES, subset_index

#: The prediction columns, in order: the full subset, then each modality alone.
FIGURE_SUBSETS: tuple[int, ...] = (FULL_SUBSET_INDEX, *(subset_index(m) for m in MODALITIES))
#: Overlay colours (RGB in [0, 1]) and legend names per internal label.
LABEL_COLOURS: dict[int, tuple[float, float, float]] = {
    EDEMA: (0.0, 1.0, 0.0),
    NECROSIS: (1.0, 0.0, 0.0),
    ENHANCING: (1.0, 1.0, 0.0),
}
LABEL_NAMES: dict[int, str] = {
    EDEMA: "ED (edema)",
    NECROSIS: "NCR/NET (necrotic / non-enhancing core)",
    ENHANCING: "ET (enhancing tumour)",
}
ALPHA = 0.6  # the colour's weight where a label is; the grey image's is 1 - ALPHA
VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
_VIEW_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # the RAS+ array axis each view cuts across
_AXIS_NAME = "xyz"

DPI = 100
PANEL = 200  # px, one panel's square cell
PAD = 3  # px, between a panel's image and its cell's edge
LEFT, TOP, BOTTOM = 24, 64, 36  # px: row names; title + column titles; legend


def figure_size(columns: int) -> tuple[int, int]:
    """(width, height) in pixels of a case figure with `columns` columns."""
    return LEFT + PANEL * columns, TOP + len(VIEWS) * PANEL + BOTTOM


def panel_box(row: int, column: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in pixels of a panel's cell in the figure (image row 0 at the top)."""
    left, top = LEFT + PANEL * column, TOP + PANEL * row
    return left, top, left + PANEL, top + PANEL


def slice_centre(truth: np.ndarray) -> tuple[tuple[int, int, int], bool]:
    """((x, y, z), has tumour): the centre of the bounding box of `truth` > 0, else of the volume."""
    coords = np.argwhere(np.asarray(truth) > 0)
    if coords.size == 0:
        return tuple(int(s) // 2 for s in truth.shape[:3]), False
    return tuple(int(c) for c in (coords.min(0) + coords.max(0)) // 2), True


def display(plane: np.ndarray) -> np.ndarray:
    """A slice of a RAS+ volume, (first axis, second axis) as cut, the radiological way: image rows
    run from the second axis's high end (anterior in axial, superior in coronal and sagittal) down,
    columns from the first axis's high end (the subject's right; anterior in sagittal) across."""
    return np.rot90(plane)[:, ::-1]


def cut(volume: np.ndarray, view: str, centre) -> np.ndarray:
    """The displayed slice (`display`) of `view` through `centre` of a (x, y, z, ...) volume."""
    axis = _VIEW_AXIS[view]
    return display(np.take(volume, centre[axis], axis=axis))


def _aspect(view: str, spacing) -> float:
    kept = [a for a in range(3) if a != _VIEW_AXIS[view]]  # displayed: columns along kept[0], rows along kept[1]
    return float(spacing[kept[1]]) / float(spacing[kept[0]])


def grey_window(channel: np.ndarray) -> tuple[float, float]:
    """Display range of a normalised modality: its 0.5 and 99.5 percentiles over the non-zero (brain) voxels."""
    values = np.asarray(channel)[np.asarray(channel) != 0]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [0.5, 99.5])
    return float(lo), (float(hi) if hi > lo else float(lo) + 1.0)


def grey(plane: np.ndarray, window) -> np.ndarray:
    """A slice scaled to [0, 1] by `window` (lo, hi)."""
    lo, hi = window
    return np.clip((np.asarray(plane, np.float64) - lo) / (hi - lo), 0.0, 1.0)


def overlay(grey_plane: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1]: the grey slice, blended with each label's colour (`ALPHA`) where it is."""
    rgb = np.repeat(np.asarray(grey_plane, np.float64)[..., None], 3, axis=-1)
    for label, colour in LABEL_COLOURS.items():
        where = labels == label
        rgb[where] = (1.0 - ALPHA) * rgb[where] + ALPHA * np.asarray(colour)
    return rgb


def _dice_text(dice) -> str:
    return " ".join(f"{r} {'n/a' if not np.isfinite(d) else f'{100 * d:.1f}'}" for r, d in zip(REGIONS, dice))


def figure_columns(allowed) -> list[int]:
    """The subsets shown (`FIGURE_SUBSETS` that are `allowed`: served and scored on the case)."""
    return [s for s in FIGURE_SUBSETS if allowed[s]]


def case_figure(case_id: str, image, truth, predicted, dice, allowed, spacing=(1.0, 1.0, 1.0)):
    """The matplotlib Figure of one case (module docstring): `image` (x, y, z, 4) in `MODALITIES`
    order, `truth` (x, y, z) internal labels, `predicted` (15, x, y, z) the label map of each
    subset, `dice` (15, 3), `allowed` (15,) bool, `spacing` the voxel size along x, y, z."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image, truth = np.asarray(image), np.asarray(truth)
    subsets = figure_columns(allowed)
    columns = [("FLAIR", None), ("T1ce", None), ("ground truth", truth)] + [
        (f"{SUBSET_NAMES[s]}\n{_dice_text(dice[s])}", np.asarray(predicted[s])) for s in subsets
    ]
    width, height = figure_size(len(columns))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    centre, has_tumour = slice_centre(truth)
    flair, t1ce = image[..., MODALITIES.index("flair")], image[..., MODALITIES.index("t1ce")]
    windows = {"FLAIR": grey_window(flair), "T1ce": grey_window(t1ce)}
    brain = (image != 0).any(axis=-1)  # the cache's normalisation leaves 0 outside the brain: shown black
    for row, view in enumerate(VIEWS):
        inside = cut(brain, view, centre)
        base = grey(cut(flair, view, centre), windows["FLAIR"]) * inside
        for column, (title, labels) in enumerate(columns):
            left, top, right, bottom = panel_box(row, column)
            ax = fig.add_axes(
                (
                    (left + PAD) / width,
                    1 - (bottom - PAD) / height,
                    (PANEL - 2 * PAD) / width,
                    (PANEL - 2 * PAD) / height,
                )
            )
            if labels is not None:
                shown = overlay(base, cut(labels, view, centre))
            elif title == "FLAIR":
                shown = base
            else:
                shown = grey(cut(t1ce, view, centre), windows["T1ce"]) * inside
            ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect=_aspect(view, spacing))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
            if row == 0:
                ax.set_title(title, fontsize=8, pad=3)
        axis = _VIEW_AXIS[view]
        fig.text(
            LEFT / 2 / width,
            1 - (TOP + PANEL * (row + 0.5)) / height,
            f"{view} {_AXIS_NAME[axis]}={centre[axis]}",
            rotation=90,
            ha="center",
            va="center",
            fontsize=8,
        )
    where = "tumour box centre" if has_tumour else "volume centre (no tumour)"
    fig.text(
        0.5,
        1 - 12 / height,
        f"{case_id}: slices through {where} {centre}; radiological (subject's right on the left)",
        ha="center",
        va="center",
        fontsize=9,
    )
    handles = [Patch(color=LABEL_COLOURS[label], label=LABEL_NAMES[label]) for label in (NECROSIS, EDEMA, ENHANCING)]
    fig.legend(
        handles=handles, loc="center", bbox_to_anchor=(0.5, BOTTOM / 2 / height), ncol=3, frameon=False, fontsize=8
    )
    return fig


def render(fig) -> np.ndarray:
    """(height, width, 3) uint8 pixels of a Figure drawn at its own size and dpi."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_pixels(pixels: np.ndarray, path) -> Path:
    """Write (H, W, 3|4) uint8 pixels as a PNG, atomically (`files.write_atomic`: a temporary file
    in the folder, then a rename)."""
    import matplotlib.image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, lambda tmp: matplotlib.image.imsave(tmp, pixels, format="png", dpi=DPI))
    return path


def save_figure(fig, path, dpi: int = DPI) -> Path:
    """Write a Figure atomically in the format of the path's suffix (.png, .pdf, .svg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".").lower(), dpi=dpi))
    return path


def write_case_figure(
    path, case_id: str, image, truth, predicted, dice, allowed, spacing=(1.0, 1.0, 1.0)
) -> np.ndarray:
    """Draw a case's figure (`case_figure`), write it as a PNG at `path`; its pixels (H, W, 3) uint8."""
    pixels = render(case_figure(case_id, image, truth, predicted, dice, allowed, spacing))
    save_pixels(pixels, path)
    return pixels


def log_figures(writer, step: int, images, prefix: str = "figures") -> None:
    """Add each ``case_id -> (H, W, 3) uint8`` image to a TensorBoard writer (tensorboardX
    `SummaryWriter`) as ``<prefix>/<case_id>`` at `step`."""
    for case_id, pixels in images.items():
        writer.add_image(f"{prefix}/{case_id}", np.asarray(pixels, np.uint8), int(step), dataformats="HWC")
    writer.flush()


class CaseFigures:
    """The figures of an evaluation's first `count` cases: ``<out>/figures/<case_id>.png`` and the
    same images in ``<out>/tensorboard/`` at `step` (the writer opens with the first figure)."""

    def __init__(self, out_dir, count: int, step: int = 0):
        self.out_dir, self.count, self.step = Path(out_dir), int(count), int(step)
        self.writer = None

    def add(self, index: int, case_id: str, image, truth, predicted, dice, allowed, spacing=(1.0, 1.0, 1.0)) -> None:
        """The figure of the `index`-th case evaluated, if it is one of the first `count`."""
        if index >= self.count:
            return
        pixels = write_case_figure(
            self.out_dir / "figures" / f"{case_id}.png", case_id, image, truth, predicted, dice, allowed, spacing
        )
        if self.writer is None:
            tensorboard = require("tensorboardX", "the evaluation figures' TensorBoard log")
            self.writer = tensorboard.SummaryWriter(str(self.out_dir / "tensorboard"))
        log_figures(self.writer, self.step, {case_id: pixels})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
