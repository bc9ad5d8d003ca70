"""Camera geometry: published calibration against cameras.json, hand-computed projections, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from h2ot import camera as cam

SHARED_CAMERAS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "h36m" / "cameras.json"


def _simple(k=(0.0, 0.0, 0.0), p=(0.0, 0.0)) -> cam.Camera:
    return cam.Camera("c", np.eye(3), np.zeros(3), 1000.0, 1000.0, 500.0, 400.0, 1000, 800, k=k, p=p)


def test_hand_computed_pixels():
    x = np.array([0.1, -0.2, 2.0])
    # x/z = (0.05, -0.1), r2 = 0.0125; radial only: 1 + 0.1 * 0.0125 = 1.00125
    np.testing.assert_allclose(cam.project_to_2d(x, _simple(k=(0.1, 0, 0))), [550.0625, 299.875], atol=1e-9)
    # tangential only: tan = 0.01*0.05 + 0.02*(-0.1) = -0.0015; x' = x*(1-0.0015) + (0.01, 0.02)*0.0125
    np.testing.assert_allclose(cam.project_to_2d(x, _simple(p=(0.01, 0.02))), [550.05, 300.4], atol=1e-9)


def test_torch_matches_numpy():
    c = cam.h36m_camera("S1", "54138969")
    x = np.random.default_rng(0).normal([0, 0, 1], 0.5, size=(5, 17, 3))
    xc = c.world_to_camera(x)
    uv = cam.project_to_2d(xc, c)
    uv_t = cam.project_to_2d(torch.from_numpy(xc), c)
    np.testing.assert_allclose(uv_t.numpy(), uv, rtol=1e-10)
    np.testing.assert_allclose(c.camera_to_world(torch.from_numpy(xc)).numpy(), x, atol=1e-9)


def test_round_trips():
    c = cam.h36m_camera("S9", "55011271")
    x = np.random.default_rng(1).normal(size=(10, 3))
    np.testing.assert_allclose(c.camera_to_world(c.world_to_camera(x)), x, atol=1e-12)
    uv = np.random.default_rng(2).uniform(0, 1000, size=(10, 2))
    np.testing.assert_allclose(cam.image_coordinates(c.normalize(uv), c.width, c.height), uv, atol=1e-9)
    n = cam.normalize_screen_coordinates(np.array([[0.0, 0.0], [1000.0, 1002.0]]), 1000, 1002)
    np.testing.assert_allclose(n, [[-1.0, -1.002], [1.0, 1.002]])
    R = c.R
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(R) == pytest.approx(1.0)


def test_look_at_centres_target_and_is_upright():
    c = cam.look_at([0.0, -5.0, 1.5], [0.0, 0.0, 1.0], name="v")
    uv = c.project(c.world_to_camera(np.array([0.0, 0.0, 1.0])))
    np.testing.assert_allclose(uv, [500, 500], atol=1e-9)
    head, foot = c.world_to_camera(np.array([[0, 0, 1.7], [0, 0, 0.0]]))
    assert c.project(head)[1] < c.project(foot)[1]  # up in the world is up in the image
    right = c.project(c.world_to_camera(np.array([0.5, 0, 1.0])))
    assert right[0] > 500  # +x world is on the right for a camera looking along +y
    ring = cam.camera_ring([0, 0, 1.0], n=4, radius_m=5.0, height_m=1.5)
    for c in ring:
        np.testing.assert_allclose(np.linalg.norm(c.t[:2]), 5.0)
        np.testing.assert_allclose(c.project(c.world_to_camera(np.array([0, 0, 1.0]))), [500, 500], atol=1e-9)


def test_unknown_subject_is_a_clear_error():
    with pytest.raises(KeyError, match="S2"):
        cam.h36m_camera("S2", "54138969")


@pytest.mark.skipif(not SHARED_CAMERAS.is_file(), reason="shared data (../shared) not present")
def test_against_published_check_values():
    data = json.loads(SHARED_CAMERAS.read_text())
    for check in data["check_values"]:
        c = cam.h36m_camera(check["subject"], check["camera"])
        xc = c.world_to_camera(np.array(check["world_m"]))
        np.testing.assert_allclose(xc, check["camera_m"], atol=1e-5)
        np.testing.assert_allclose(c.project(xc), check["pixel"], atol=1e-3)
    # the calibration carried in code equals the file's
    for cam_id, intr in data["intrinsics"].items():
        c = cam.h36m_camera("S1", cam_id)
        assert (c.fx, c.fy, c.cx, c.cy, c.width, c.height) == (
            intr["fx"], intr["fy"], intr["cx"], intr["cy"], intr["width"], intr["height"])
        assert c.k == (intr["k1"], intr["k2"], intr["k3"]) and c.p == (intr["p1"], intr["p2"])
    for subject, cams in data["extrinsics"].items():
        for entry in cams:
            c = cam.h36m_camera(subject, entry["camera"])
            np.testing.assert_allclose(c.t * 1000, entry["translation_mm"], rtol=1e-12)
            np.testing.assert_allclose(c.R, cam.quaternion_to_matrix(entry["orientation_wxyz"]))
