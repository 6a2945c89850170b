"""Crops in mm around a patient point, sagittal mirroring, and finding a point's axial stack."""

from __future__ import annotations

import numpy as np
import pytest

from lsdc.datasets.crops import CropSpec, crop_points, extract_crop, locate_in_stacks
from lsdc.preprocessing.geometry import StackGeometry


def _rotation_x(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def _stack(
    row: np.ndarray,
    col: np.ndarray,
    centre: np.ndarray,
    n_slices: int,
    slice_mm: float,
    pixel_mm: tuple[float, float],
    size: tuple[int, int] = (40, 36),
) -> StackGeometry:
    """A stack of ``n_slices`` planes centred on ``centre``, slices ascending along -normal or
    +normal as the cache orders them (the geometry must work either way)."""
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    corner = centre - (size[0] - 1) / 2 * pixel_mm[0] * col - (size[1] - 1) / 2 * pixel_mm[1] * row
    offsets = (np.arange(n_slices) - (n_slices - 1) / 2) * slice_mm
    positions = corner[None] + offsets[:, None] * normal[None]
    return StackGeometry(positions, row, col, pixel_mm, tuple(range(1, n_slices + 1)))


CENTRE = np.array([3.0, -20.0, 40.0])
SERIES = {
    # Sagittal: columns anterior->posterior, rows superior->inferior, slices along x.
    "sagittal": _stack([0, 1, 0], [0, 0, -1], CENTRE, 15, 3.5, (0.9, 0.8)),
    "axial": _stack([1, 0, 0], [0, 1, 0], CENTRE, 12, 4.0, (0.7, 0.7)),
    "oblique_axial": _stack(
        _rotation_x(14) @ [1, 0, 0], _rotation_x(14) @ [0, 1, 0], CENTRE, 10, 3.0, (0.75, 0.6)
    ),
}


def _voxel_points(geometry: StackGeometry, shape: tuple[int, int, int]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return geometry.voxel_to_patient(grid.reshape(-1, 3)).reshape(*shape, 3)


def _shape(geometry: StackGeometry) -> tuple[int, int, int]:
    return (geometry.n_slices, 40, 36)


@pytest.mark.parametrize("name", sorted(SERIES))
def test_crop_samples_a_linear_volume_exactly_where_its_points_say(name: str) -> None:
    """Linear interpolation is exact on a linear field, so crop values = field(crop points)."""
    geometry = SERIES[name]
    coefficients = np.array([0.3, -0.7, 1.1])
    volume = _voxel_points(geometry, _shape(geometry)) @ coefficients
    spec = CropSpec(field_mm=16.0, size=8, n_slices=3)
    for mirror in (False, True):
        points = crop_points(geometry, CENTRE + [1.0, 2.0, -1.5], spec, mirror=mirror)
        crop = extract_crop(volume, geometry, CENTRE + [1.0, 2.0, -1.5], spec, mirror=mirror)
        assert crop.shape == (3, 8, 8)
        np.testing.assert_allclose(crop, points @ coefficients, atol=1e-3)
    # Pixels are field/size mm apart along the stack's own in-plane axes, planes one slice apart.
    points = crop_points(geometry, CENTRE, spec)
    np.testing.assert_allclose(points[0, 0, 1] - points[0, 0, 0], 2.0 * geometry.row_direction)
    np.testing.assert_allclose(points[0, 1, 0] - points[0, 0, 0], 2.0 * geometry.column_direction)
    np.testing.assert_allclose(
        points[1, 0, 0] - points[0, 0, 0], geometry.slice_spacing * geometry.normal
    )


@pytest.mark.parametrize("name", sorted(SERIES))
@pytest.mark.parametrize("offset", [(0.0, 0.0, 0.0), (6.0, -9.0, 4.0), (-5.0, 12.0, -8.0)])
def test_crop_centred_near_a_finding_contains_it_in_mm(name: str, offset: tuple) -> None:
    """A bright 'finding' at a patient point shows up in the crop at that point, to within the
    sampling grid, on sagittal, axial and oblique axial stacks alike."""
    geometry = SERIES[name]
    finding = CENTRE + np.array([2.0, -3.0, 1.0])
    distance = np.linalg.norm(_voxel_points(geometry, _shape(geometry)) - finding, axis=-1)
    volume = np.exp(-(distance**2) / (2 * 3.0**2))
    spec = CropSpec(field_mm=50.0, size=50, n_slices=9)
    centre = finding + np.asarray(offset)
    crop = extract_crop(volume, geometry, centre, spec)
    points = crop_points(geometry, centre, spec)
    brightest = points[np.unravel_index(np.argmax(crop), crop.shape)]
    # Within half a pixel in-plane and half a slice along the normal.
    error = brightest - finding
    along_normal = abs(error @ geometry.normal)
    in_plane = np.linalg.norm(error - (error @ geometry.normal) * geometry.normal)
    assert along_normal <= geometry.slice_spacing / 2 + 1e-6
    assert in_plane <= np.sqrt(2) * 0.5 + 1e-6
    assert crop.max() > 0.6


@pytest.mark.parametrize("name", sorted(SERIES))
def test_mirrored_crop_of_a_right_finding_equals_crop_of_its_left_twin(name: str) -> None:
    """Mirroring through the sagittal plane turns a patient-right structure into the picture of
    the same structure on the left: the one-model-for-both-sides premise."""
    geometry = SERIES[name]
    voxels = _voxel_points(geometry, _shape(geometry))
    centre = CENTRE.copy()
    right = centre + np.array([-9.0, 2.0, 1.5])  # LPS: -x is the patient's right
    left = centre + np.array([9.0, 2.0, 1.5])

    def blob(at: np.ndarray) -> np.ndarray:
        return np.exp(-(np.linalg.norm(voxels - at, axis=-1) ** 2) / (2 * 4.0**2))

    spec = CropSpec(field_mm=40.0, size=20, n_slices=5)
    mirrored_right = extract_crop(blob(right), geometry, centre, spec, mirror=True)
    plain_left = extract_crop(blob(left), geometry, centre, spec)
    plain_right = extract_crop(blob(right), geometry, centre, spec)
    assert np.abs(mirrored_right - plain_left).max() < 0.1
    # ...and the mirror did something: unmirrored, left and right crops differ.
    assert np.abs(plain_right - plain_left).max() > 0.5


def test_crop_outside_the_stack_reads_zero() -> None:
    geometry = SERIES["axial"]
    volume = np.ones(_shape(geometry), dtype=np.float32)
    crop = extract_crop(volume, geometry, CENTRE + [0, 0, 500.0], CropSpec(10.0, 4, 3))
    assert crop.shape == (3, 4, 4) and not crop.any()


def test_crop_spec_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        CropSpec(field_mm=0.0)
    with pytest.raises(ValueError):
        CropSpec(slice_step_mm=-1.0)


def _disc_stack(z: float, tilt: float, n_slices: int = 5) -> StackGeometry:
    """A short axial stack tilted ``tilt`` degrees about x, centred at height ``z``."""
    rot = _rotation_x(tilt)
    return _stack(
        rot @ [1, 0, 0], rot @ [0, 1, 0], np.array([0.0, 0.0, z]), n_slices, 4.0, (0.8, 0.8)
    )


def test_level_points_go_to_the_axial_stack_and_slice_through_them() -> None:
    """Two tilted disc stacks (as real Axial T2 series often are): each level point is found in
    the stack that covers it, on the slice that passes through it."""
    stacks = [_disc_stack(0.0, 10.0), _disc_stack(40.0, -12.0)]
    shapes = [(5, 40, 36), (5, 40, 36)]
    for k, stack in enumerate(stacks):
        for slice_index in range(5):
            point = stack.voxel_to_patient([[slice_index, 18.0, 20.0]])[0]
            found, voxel = locate_in_stacks(point, stacks, shapes)
            assert found == k
            assert round(voxel[0]) == slice_index
            np.testing.assert_allclose(voxel, [slice_index, 18.0, 20.0], atol=1e-9)
    # A point between the stacks goes to the nearer one, as a fallback.
    found, _ = locate_in_stacks(np.array([0.0, 0.0, 33.0]), stacks, shapes)
    assert found == 1


class _CountingArray:
    """A stack that counts the voxels read from it, as a memory map pages them in."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.voxels_read = array, array.shape, array.dtype, 0

    def __getitem__(self, key: object) -> np.ndarray:
        block = self.array[key]
        self.voxels_read += block.size
        return block

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        self.voxels_read += self.array.size
        return self.array if dtype is None else self.array.astype(dtype)


@pytest.mark.parametrize("name", sorted(SERIES))
def test_crop_reads_only_its_neighbourhood_and_matches_the_whole_stack(name: str) -> None:
    """A 20 mm crop of a 256 x 256 stack reads a few percent of it, and gives exactly what
    interpolating the whole stack gives, also where the crop overhangs the stack's edges."""
    from scipy.ndimage import map_coordinates

    geometry = SERIES[name]
    shape = (geometry.n_slices, 256, 256)
    volume = np.random.default_rng(0).integers(0, 4000, shape).astype(np.uint16)
    spec = CropSpec(field_mm=20.0, size=16, n_slices=3)
    corner = geometry.voxel_to_patient([[0.0, 0.0, 0.0]])[0]
    for centre in (geometry.voxel_to_patient([[shape[0] / 2, 128.0, 100.0]])[0], corner):
        for mirror, rotation in ((False, 0.0), (True, 17.0)):
            counting = _CountingArray(volume)
            crop = extract_crop(counting, geometry, centre, spec, mirror, rotation)
            points = crop_points(geometry, centre, spec, mirror, rotation).reshape(-1, 3)
            whole = map_coordinates(
                volume.astype(np.float32), geometry.patient_to_voxel(points).T, order=1,
                mode="constant", cval=0.0,
            )  # fmt: skip
            np.testing.assert_array_equal(crop.ravel(), whole)
            assert counting.voxels_read < 0.05 * volume.size, counting.voxels_read
