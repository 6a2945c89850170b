"""StackGeometry and project_point against hand-computed DICOM geometry (PS3.3 C.7.6.2.1.1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dicom_factory import AXIAL, SAGITTAL, oblique, rotation

from lsdc.preprocessing.geometry import StackGeometry, project_point


def make_geometry(orientation, origin, step, n, spacing=(0.6, 0.8), instances=None, gaps=None):
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    offsets = np.arange(n, dtype=float) * step if gaps is None else np.asarray(gaps, dtype=float)
    return StackGeometry(
        positions=np.asarray(origin) + offsets[:, None] * normal,
        row_direction=o[:3],
        column_direction=o[3:],
        pixel_spacing=spacing,
        instance_numbers=tuple(instances or range(1, n + 1)),
    )


def dicom_pixel_to_patient(position, orientation, spacing, x, y):
    """The standard's equation: P = S + x * dc * X + y * dr * Y (x = column, y = row)."""
    o = np.asarray(orientation, dtype=float)
    return np.asarray(position) + x * spacing[1] * o[:3] + y * spacing[0] * o[3:]


OBLIQUE_AXIAL = oblique(AXIAL, rotation("x", 17) @ rotation("y", -8))


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL, OBLIQUE_AXIAL])
def test_pixel_to_patient_matches_the_dicom_equation(orientation):
    g = make_geometry(
        orientation, origin=(-12.0, 30.0, 5.0), step=3.3, n=7, instances=range(20, 27)
    )
    expected = dicom_pixel_to_patient(g.positions[4], orientation, g.pixel_spacing, 10.5, 3.25)
    np.testing.assert_allclose(g.pixel_to_patient(24, 10.5, 3.25), expected, atol=1e-9)


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL, OBLIQUE_AXIAL])
def test_voxel_patient_round_trip_with_uneven_gaps(orientation):
    g = make_geometry(
        orientation, origin=(3.0, -7.0, 40.0), step=0, n=5, gaps=[0.0, 4.0, 8.0, 16.0, 20.0]
    )
    voxels = np.random.default_rng(0).uniform([-1, -5, -5], [5, 40, 40], size=(50, 3))
    np.testing.assert_allclose(g.patient_to_voxel(g.voxel_to_patient(voxels)), voxels, atol=1e-9)
    # halfway across the double gap between slices 2 and 3 is slice 2.5, i.e. 12 mm from slice 0
    point = g.positions[0] + 12.0 * g.normal
    np.testing.assert_allclose(g.patient_to_voxel(point[None])[0], [2.5, 0.0, 0.0], atol=1e-9)


def test_affine_agrees_with_voxel_to_patient_for_even_stacks():
    g = make_geometry(OBLIQUE_AXIAL, origin=(1.0, 2.0, 3.0), step=4.0, n=6)
    voxels = np.array([[0, 0, 0], [5, 7, 3], [2.5, 1.5, 9.25]])
    homogeneous = np.c_[voxels, np.ones(len(voxels))]
    np.testing.assert_allclose((g.affine @ homogeneous.T).T[:, :3], g.voxel_to_patient(voxels))
    assert g.spacing == pytest.approx((4.0, 0.6, 0.8))


def test_project_point_from_sagittal_to_oblique_axial():
    """A point on axial slice 3 at (row 5.5, col 2.25), seen on the sagittal slice through it,
    projects back to exactly that axial voxel."""
    axial = make_geometry(OBLIQUE_AXIAL, origin=(-20.0, -15.0, 60.0), step=4.0, n=6)
    truth = dicom_pixel_to_patient(
        axial.positions[3], OBLIQUE_AXIAL, axial.pixel_spacing, 2.25, 5.5
    )
    # sagittal slices every 3.5 mm along -x, slice 2 passes through the point's x
    sag_origin = np.array([truth[0] + 7.0, -40.0, 120.0])
    sagittal = make_geometry(SAGITTAL, origin=sag_origin, step=3.5, n=5, spacing=(0.7, 0.7))
    rel = truth - sagittal.positions[2]
    x = rel @ np.array(SAGITTAL[:3]) / 0.7
    y = rel @ np.array(SAGITTAL[3:]) / 0.7
    np.testing.assert_allclose(
        project_point(sagittal, sagittal.instance_numbers[2], x, y, axial),
        [3.0, 5.5, 2.25],
        atol=1e-9,
    )


def test_single_slice_stack_maps_both_ways():
    g = make_geometry(AXIAL, origin=(0.0, 0.0, 10.0), step=1.0, n=1)
    np.testing.assert_allclose(
        g.patient_to_voxel([[0.8, 1.2, 10.0]]), [[0.0, 2.0, 1.0]], atol=1e-12
    )
    np.testing.assert_allclose(
        g.voxel_to_patient([[0.0, 2.0, 1.0]]), [[0.8, 1.2, 10.0]], atol=1e-12
    )


def test_pixel_voxel_round_trip_in_csv_terms():
    g = make_geometry(SAGITTAL, origin=(5.0, 0.0, 0.0), step=3.0, n=4, instances=[9, 4, 12, 1])
    np.testing.assert_array_equal(g.pixel_to_voxel(12, 7.5, 3.25), [2.0, 3.25, 7.5])
    assert g.voxel_to_pixel([2.0, 3.25, 7.5]) == (12, 7.5, 3.25)
    assert g.voxel_to_pixel([0.6, 0.0, 0.0])[0] == 4  # nearest slice
    point = g.pixel_to_patient(1, 2.0, 1.0)
    assert g.voxel_to_pixel(g.patient_to_voxel(point[None])[0]) == pytest.approx((1, 2.0, 1.0))


def test_slice_index_and_unknown_instance():
    g = make_geometry(AXIAL, origin=(0, 0, 0), step=2.0, n=4, instances=[9, 4, 12, 1])
    assert [g.slice_index(i) for i in (9, 4, 12, 1)] == [0, 1, 2, 3]
    with pytest.raises(KeyError, match="instance_number 5 is not in this stack"):
        g.slice_index(5)


def test_to_dict_survives_json():
    g = make_geometry(OBLIQUE_AXIAL, origin=(1.5, -2.5, 3.25), step=3.0, n=3, instances=[5, 2, 7])
    restored = StackGeometry.from_dict(json.loads(json.dumps(g.to_dict())))
    assert restored == g
    assert restored.instance_numbers == (5, 2, 7)
    np.testing.assert_array_equal(restored.normal, g.normal)


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="instance numbers"):
        StackGeometry(np.zeros((2, 3)), [1, 0, 0], [0, 1, 0], (1, 1), (1,))
    with pytest.raises(ValueError, match="no length"):
        StackGeometry(np.zeros((1, 3)), [0, 0, 0], [0, 1, 0], (1, 1), (1,))
    with pytest.raises(ValueError, match="are parallel"):
        StackGeometry(np.zeros((1, 3)), [0, 1, 0], [0, 2, 0], (1, 1), (1,))
