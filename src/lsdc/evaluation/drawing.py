"""The study viewer's second concern: a :class:`~lsdc.evaluation.study_view.SliceView` or a
study's crops as a PIL image (marks, names and distances drawn), and an image as an inline JPEG.

The colours are chosen so that no pixel of a grey slice takes them: a test finds the marks by
colour alone.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lsdc.contract import CONDITIONS, LEVELS, N_LABELS
from lsdc.evaluation import plots
from lsdc.evaluation.study_view import Mark, SliceView

PREDICTED_RGB = (255, 40, 40)
"""Stage 1's predicted points: red crosses (no pixel of a grey slice is this red)."""
LABELLED_RGB = (40, 220, 90)
"""Labelled points (train_label_coordinates.csv): green circles."""
LINK_RGB = (255, 210, 0)
"""The line from a predicted point to its labelled point."""
TEXT_RGB = (255, 255, 170)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (np.asarray(values, dtype=np.float32) - low) / max(high - low, 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def jpeg_tag(image: Image.Image, alt: str) -> str:
    """An inline JPEG: MR images are noisy, so PNG would be three times larger. Quality 90 with
    full-resolution colour keeps the one-pixel marks crisp."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, subsampling=0)
    return plots.img_tag(buffer.getvalue(), alt, mime="image/jpeg")


def marker_position(
    mark: Mark, shape: tuple[int, int], size: tuple[int, int]
) -> tuple[float, float]:
    """Pixel (x, y) of a mark on a slice of ``shape`` (rows, cols) drawn at ``size`` (width,
    height): voxel centres land on the centres of the pixels they are resized onto."""
    rows, cols = shape
    return (mark.col + 0.5) * size[0] / cols - 0.5, (mark.row + 0.5) * size[1] / rows - 0.5


def slice_image(view: SliceView, side: int, errors: np.ndarray | None = None) -> Image.Image:
    """A slice at its physical aspect, the longer side ``side`` pixels, with its marks drawn:
    labelled points as green circles, predicted ones as red crosses joined to their labelled
    point; with ``errors`` (full pages) each predicted point's name, distance in mm and
    distance off the slice written beside it.

    Raises:
        ValueError: the view has no image (a missing series).
    """
    if view.image is None:
        raise ValueError(f"{view.title}: no image (missing series)")
    rows, cols = view.image.shape
    low, high = np.percentile(view.image, [0.5, 99.5])
    height_mm, width_mm = rows * view.pixel_spacing[0], cols * view.pixel_spacing[1]
    scale = side / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    gray = Image.fromarray(_to_uint8(view.image, low, high)).resize(size, Image.Resampling.BILINEAR)
    image = gray.convert("RGB")
    draw = ImageDraw.Draw(image)
    r = max(3, side // 60)
    at = {(m.label, m.predicted): marker_position(m, (rows, cols), size) for m in view.marks}
    for (j, predicted), xy in at.items():
        if predicted and (j, False) in at:
            draw.line([xy, at[(j, False)]], fill=LINK_RGB, width=1)
    for m in view.marks:
        x, y = at[(m.label, m.predicted)]
        if m.predicted:
            draw.line([(x - r, y), (x + r, y)], fill=PREDICTED_RGB, width=2)
            draw.line([(x, y - r), (x, y + r)], fill=PREDICTED_RGB, width=2)
        else:
            draw.ellipse([x - r, y - r, x + r, y + r], outline=LABELLED_RGB, width=2)
    if errors is not None:
        _write_names(draw, view.marks, at, errors, size[0], r)
    return image


def _write_names(
    draw: ImageDraw.ImageDraw,
    marks: list[Mark],
    at: dict[tuple[int, bool], tuple[float, float]],
    errors: np.ndarray,
    width: int,
    r: int,
) -> None:
    """Beside each predicted point (each labelled one when there are none): its name, its
    distance to the labelled point and how many slices off the shown slice it lies. Points side
    by side (left and right on an axial slice) get their text on their outer sides."""
    font = _font(11)
    has_predicted = any(m.predicted for m in marks)
    named = [m for m in marks if m.predicted == has_predicted]
    xs = np.array([at[(m.label, m.predicted)][0] for m in named])
    ys = np.array([at[(m.label, m.predicted)][1] for m in named])
    side_by_side = len(named) > 1 and np.ptp(xs) > np.ptp(ys)
    for m, x, y in zip(named, xs, ys, strict=True):
        text = m.name
        if np.isfinite(errors[m.label]):
            text += f": {errors[m.label]:.1f} mm"
        if abs(m.off_slices) >= 0.5:
            text += f" ({m.off_slices:+.0f} sl)"
        length = draw.textlength(text, font=font)
        right = x >= xs.mean() if side_by_side else True
        if right and x + r + 3 + length > width:
            right = False
        elif not right and x - r - 3 - length < 0:
            right = True
        tx = x + r + 3 if right else x - r - 3 - length
        draw.text(
            (tx, y - 7), text, fill=TEXT_RGB, font=font, stroke_width=1, stroke_fill=(0, 0, 0)
        )


def crop_window(crops: np.ndarray, present: np.ndarray) -> tuple[float, float]:
    """One intensity window for all of a study's crops (they share the grader's normalisation,
    so relative brightness between them is kept)."""
    values = crops[present] if present.any() else crops
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high)


def crop_image(crop: np.ndarray, window: tuple[float, float], cell: int) -> Image.Image:
    """One crop's planes side by side, each ``cell`` pixels square, 2 px apart."""
    planes = [
        Image.fromarray(_to_uint8(plane, *window)).resize((cell, cell), Image.Resampling.BILINEAR)
        for plane in crop
    ]
    image = Image.new("L", (len(planes) * (cell + 2) - 2, cell), 0)
    for k, plane in enumerate(planes):
        image.paste(plane, (k * (cell + 2), 0))
    return image


def crop_montage(crops: np.ndarray, present: np.ndarray, cell: int) -> Image.Image:
    """The middle plane of every crop on a 5 x 5 grid: conditions down, levels across."""
    window = crop_window(crops, present)
    n_conditions, n_levels = len(CONDITIONS), len(LEVELS)
    image = Image.new("RGB", (n_levels * (cell + 2), n_conditions * (cell + 2)), (60, 60, 60))
    middle = crops.shape[1] // 2
    for j in range(N_LABELS):
        if not present[j]:
            continue
        plane = Image.fromarray(_to_uint8(crops[j, middle], *window))
        plane = plane.resize((cell, cell), Image.Resampling.BILINEAR).convert("RGB")
        image.paste(plane, ((j % n_levels) * (cell + 2), (j // n_levels) * (cell + 2)))
    return image
