"""Camera geometry, in one place: the published Human3.6M calibration, projection and screen normalisation.

Conventions (those of the Human3.6M release and VideoPose3D's `common/camera.py`):

- World frame: metres, right-handed, z up. A camera is a rotation `R` [3, 3] whose columns are the camera axes
  (x right, y down, z forward) in world coordinates, and a centre `t` [3] in world metres.
  world -> camera: `X_cam = R^T (X_world - t)`; camera -> world: `X_world = R X_cam + t`.
- Projection (pixels): `x = X_cam[:2] / X_cam[2]` (clamped to [-1, 1] as VideoPose3D does), `r2 = |x|^2`,
  `x' = x (1 + k1 r2 + k2 r2^2 + k3 r2^3 + p1 x0 + p2 x1) + (p1, p2) r2`, `pixel = (fx, fy) x' + (cx, cy)`.
- Screen normalisation (VideoPose3D): `u_n = u / w * 2 - 1`, `v_n = v / w * 2 - h / w` (both divided by the width,
  so the aspect ratio is kept).

Every function takes numpy arrays or torch tensors with leading batch dimensions (`[..., 3]`, `[..., 2]`) and
returns the same kind. No Ray here: `pipelines/` and the models both use this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Array = Any  # np.ndarray | torch.Tensor

# ------------------------------------------------------------------------------------- published calibration
# Intrinsics of the four Human3.6M cameras: fx, fy, cx, cy (pixels), k1, k2, k3 (radial), p1, p2 (tangential),
# image width and height (pixels). Published figures, as carried by VideoPose3D and every lifting codebase.
H36M_CAMERA_IDS: tuple[str, ...] = ("54138969", "55011271", "58860488", "60457274")
_H36M_INTRINSICS: dict[str, tuple[float, ...]] = {
    "54138969": (1145.0494384765625, 1143.7811279296875, 512.54150390625, 515.4514770507812,
                 -0.20709891617298126, 0.24777518212795258, -0.0030751503072679043,
                 -0.0009756988729350269, -0.00142447161488235, 1000, 1002),
    "55011271": (1149.6756591796875, 1147.5916748046875, 508.8486328125, 508.0649108886719,
                 -0.1942136287689209, 0.2404085397720337, 0.006819975562393665,
                 -0.0016190266469493508, -0.0027408944442868233, 1000, 1000),
    "58860488": (1149.1407470703125, 1148.7989501953125, 519.8158569335938, 501.40264892578125,
                 -0.2083381861448288, 0.25548800826072693, -0.0024604974314570427,
                 0.0014843869721516967, -0.0007599993259645998, 1000, 1000),
    "60457274": (1145.5113525390625, 1144.77392578125, 514.9682006835938, 501.88201904296875,
                 -0.198384091258049, 0.21832367777824402, -0.008947807364165783,
                 -0.0005872055771760643, -0.0018133620033040643, 1000, 1002),
}
# Extrinsics per subject, in H36M_CAMERA_IDS order: orientation quaternion (w, x, y, z) and centre (mm).
_H36M_EXTRINSICS: dict[str, tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]] = {
    "S1": (
        ((0.1407056450843811, -0.1500701755285263, -0.755240797996521, 0.6223280429840088),
         (1841.1070556640625, 4955.28466796875, 1563.4454345703125)),
        ((0.6157187819480896, -0.764836311340332, -0.14833825826644897, 0.11794740706682205),
         (1761.278564453125, -5078.0068359375, 1606.2650146484375)),
        ((0.14651472866535187, -0.14647851884365082, 0.7653023600578308, -0.6094175577163696),
         (-1846.7777099609375, 5215.04638671875, 1491.972412109375)),
        ((0.5834008455276489, -0.7853162288665771, 0.14548823237419128, -0.14749594032764435),
         (-1794.7896728515625, -3722.698974609375, 1574.8927001953125)),
    ),
    "S5": (
        ((0.1467377245426178, -0.162370964884758, -0.7551892995834351, 0.6178938746452332),
         (2097.3916015625, 4880.94482421875, 1605.732421875)),
        ((0.6159758567810059, -0.7626792192459106, -0.15728192031383514, 0.1189815029501915),
         (2031.7008056640625, -5167.93310546875, 1612.923095703125)),
        ((0.14291371405124664, -0.12907841801643372, 0.7678384780883789, -0.6110143065452576),
         (-1620.5948486328125, 5171.65869140625, 1496.43701171875)),
        ((0.5920479893684387, -0.7814217805862427, 0.1274748593568802, -0.15036417543888092),
         (-1637.1737060546875, -3867.3173828125, 1547.033203125)),
    ),
    "S6": (
        ((0.1337897777557373, -0.15692396461963654, -0.7571090459823608, 0.6198879480361938),
         (1935.4517822265625, 4950.24560546875, 1618.0838623046875)),
        ((0.6147197484970093, -0.7628812789916992, -0.16174767911434174, 0.11819244921207428),
         (1969.803955078125, -5128.73876953125, 1632.77880859375)),
        ((0.1529948115348816, -0.13529130816459656, 0.7646096348762512, -0.6112781167030334),
         (-1769.596435546875, 5185.361328125, 1476.993408203125)),
        ((0.5916101336479187, -0.7804774045944214, 0.12832270562648773, -0.1561593860387802),
         (-1721.668701171875, -3884.13134765625, 1540.4879150390625)),
    ),
    "S7": (
        ((0.1435241848230362, -0.1631336808204651, -0.7548328638076782, 0.6188824772834778),
         (1974.512939453125, 4926.3544921875, 1597.8326416015625)),
        ((0.6141672730445862, -0.7638262510299683, -0.1596645563840866, 0.1177929937839508),
         (1937.0584716796875, -5119.7900390625, 1631.5665283203125)),
        ((0.14550060033798218, -0.12874816358089447, 0.7660516500473022, -0.6127139329910278),
         (-1741.8111572265625, 5208.24951171875, 1464.8245849609375)),
        ((0.5912848114967346, -0.7821764349937439, 0.12445473670959473, -0.15196487307548523),
         (-1734.7105712890625, -3832.42138671875, 1548.5830078125)),
    ),
    "S8": (
        ((0.14110587537288666, -0.15589867532253265, -0.7561917304992676, 0.619644045829773),
         (2150.65185546875, 4896.1611328125, 1611.9046630859375)),
        ((0.6169601678848267, -0.7647668123245239, -0.14846350252628326, 0.11158157885074615),
         (2219.965576171875, -5148.453125, 1613.0440673828125)),
        ((0.1471444070339203, -0.13377119600772858, 0.7670128345489502, -0.6100369691848755),
         (-1571.2215576171875, 5137.0185546875, 1498.1761474609375)),
        ((0.5927824378013611, -0.7825870513916016, 0.12147816270589828, -0.14631995558738708),
         (-1476.913330078125, -3896.7412109375, 1547.97216796875)),
    ),
    "S9": (
        ((0.15540587902069092, -0.15548215806484222, -0.7532095313072205, 0.6199594736099243),
         (2044.45849609375, 4935.1171875, 1481.2275390625)),
        ((0.618784487247467, -0.7634735107421875, -0.14132238924503326, 0.11933968216180801),
         (1990.959716796875, -5123.810546875, 1568.8048095703125)),
        ((0.13357827067375183, -0.1367100477218628, 0.7689454555511475, -0.6100738644599915),
         (-1670.9921875, 5211.98583984375, 1528.387939453125)),
        ((0.5879399180412292, -0.7823407053947449, 0.1427614390850067, -0.14794869720935822),
         (-1696.04345703125, -3827.099853515625, 1591.4127197265625)),
    ),
    "S11": (
        ((0.15232472121715546, -0.15442320704460144, -0.7547563314437866, 0.6191070079803467),
         (2098.440185546875, 4926.5546875, 1500.278564453125)),
        ((0.6189449429512024, -0.7600917220115662, -0.15300633013248444, 0.1255258321762085),
         (2083.182373046875, -4912.1728515625, 1561.07861328125)),
        ((0.14943228662014008, -0.15650227665901184, 0.7681233882904053, -0.6026304364204407),
         (-1609.8153076171875, 5177.3359375, 1537.896728515625)),
        ((0.5894251465797424, -0.7818877100944519, 0.13991211354732513, -0.14715361595153809),
         (-1590.738037109375, -3854.1689453125, 1578.017578125)),
    ),
}
H36M_SUBJECTS: tuple[str, ...] = tuple(_H36M_EXTRINSICS)
MM_PER_M = 1000.0


@dataclass(frozen=True)
class Camera:
    """A pinhole camera with Brown-Conrady distortion.

    R: [3, 3] camera->world rotation (columns = camera x right, y down, z forward, in world coordinates);
    t: [3] camera centre in world metres; fx, fy, cx, cy in pixels; k = (k1, k2, k3); p = (p1, p2);
    width, height: image size in pixels.
    """

    name: str
    R: np.ndarray
    t: np.ndarray
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    k: tuple[float, float, float] = (0.0, 0.0, 0.0)
    p: tuple[float, float] = (0.0, 0.0)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def world_to_camera(self, x_world: Array) -> Array:
        return world_to_camera(x_world, self.R, self.t)

    def camera_to_world(self, x_cam: Array) -> Array:
        return camera_to_world(x_cam, self.R, self.t)

    def project(self, x_cam: Array) -> Array:
        """Camera-frame points [..., 3] (metres) -> pixels [..., 2], with distortion."""
        return project_to_2d(x_cam, self)

    def normalize(self, uv: Array) -> Array:
        return normalize_screen_coordinates(uv, self.width, self.height)


# ------------------------------------------------------------------------------------- geometry
def _is_torch(x: Array) -> bool:
    # Checked by type name, so that numpy-only users (the Ray Data workers) never import torch.
    return type(x).__module__.split(".")[0] == "torch"


def _like(value: Any, ref: Array) -> Array:
    """`value` (numpy/list) as the array kind and dtype of `ref`."""
    if _is_torch(ref):
        import torch

        return torch.as_tensor(np.asarray(value), dtype=ref.dtype, device=ref.device)
    return np.asarray(value, dtype=ref.dtype if np.issubdtype(ref.dtype, np.floating) else np.float64)


def quaternion_to_matrix(q_wxyz: Array) -> np.ndarray:
    """Unit quaternion (w, x, y, z) -> rotation matrix [3, 3] (normalised first)."""
    w, x, y, z = np.asarray(q_wxyz, dtype=np.float64) / np.linalg.norm(np.asarray(q_wxyz, dtype=np.float64))
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def world_to_camera(x_world: Array, R: Array, t: Array) -> Array:
    """[..., 3] world metres -> [..., 3] camera metres: R^T (X - t). For row vectors that is (X - t) @ R."""
    return (x_world - _like(t, x_world)) @ _like(R, x_world)


def camera_to_world(x_cam: Array, R: Array, t: Array) -> Array:
    """[..., 3] camera metres -> [..., 3] world metres: R X + t."""
    return x_cam @ _like(R, x_cam).T + _like(t, x_cam)


def project_to_2d(x_cam: Array, camera: Camera) -> Array:
    """Camera-frame points [..., 3] (metres, z > 0) -> pixels [..., 2], radial + tangential distortion.

    As VideoPose3D's `project_to_2d`: the normalised image point is clamped to [-1, 1] before distortion.
    """
    xy = x_cam[..., :2] / x_cam[..., 2:3]
    if _is_torch(xy):
        xy = xy.clamp(-1, 1)
        r2 = (xy**2).sum(-1, keepdim=True)
    else:  # the same values bit for bit, without numpy's slow reduction over a last axis of 2
        np.clip(xy, -1, 1, out=xy)
        r2 = xy[..., 0:1] ** 2 + xy[..., 1:2] ** 2
    k1, k2, k3 = camera.k
    p1, p2 = camera.p
    radial = 1 + k1 * r2 + k2 * r2**2 + k3 * r2**3
    tan = p1 * xy[..., 0:1] + p2 * xy[..., 1:2]
    xy = xy * (radial + tan) + _like([p1, p2], xy) * r2
    return xy * _like([camera.fx, camera.fy], xy) + _like([camera.cx, camera.cy], xy)


def normalize_screen_coordinates(uv: Array, width: float, height: float) -> Array:
    """Pixels [..., 2] -> VideoPose3D screen coordinates: u/w*2 - 1, v/w*2 - h/w (x in [-1, 1])."""
    return uv / width * 2 - _like([1.0, height / width], uv)


def image_coordinates(uv_norm: Array, width: float, height: float) -> Array:
    """Inverse of `normalize_screen_coordinates`: screen coordinates [..., 2] -> pixels [..., 2]."""
    return (uv_norm + _like([1.0, height / width], uv_norm)) * width / 2


# ------------------------------------------------------------------------------------- camera tables
def h36m_camera(subject: str, camera_id: str) -> Camera:
    """The published Human3.6M camera `camera_id` (e.g. "54138969") as placed for `subject` (e.g. "S1")."""
    if subject not in _H36M_EXTRINSICS:
        raise KeyError(f"no Human3.6M calibration for subject {subject!r}; known: {list(H36M_SUBJECTS)}")
    if camera_id not in _H36M_INTRINSICS:
        raise KeyError(f"unknown Human3.6M camera {camera_id!r}; known: {list(H36M_CAMERA_IDS)}")
    fx, fy, cx, cy, k1, k2, k3, p1, p2, w, h = _H36M_INTRINSICS[camera_id]
    q, t_mm = _H36M_EXTRINSICS[subject][H36M_CAMERA_IDS.index(camera_id)]
    return Camera(
        name=camera_id, R=quaternion_to_matrix(q), t=np.asarray(t_mm) / MM_PER_M,
        fx=fx, fy=fy, cx=cx, cy=cy, width=int(w), height=int(h), k=(k1, k2, k3), p=(p1, p2),
        meta={"subject": subject},
    )


def h36m_cameras(subject: str) -> list[Camera]:
    """The four Human3.6M cameras of `subject`, in H36M_CAMERA_IDS order (VideoPose3D's order)."""
    return [h36m_camera(subject, cam) for cam in H36M_CAMERA_IDS]


# H36M-like intrinsics for virtual cameras: mean focal length and a centred principal point, no distortion.
VIRTUAL_FOCAL_PX = 1147.0
VIRTUAL_IMAGE_SIZE = (1000, 1000)


def look_at(
    eye: Array, target: Array, name: str = "virtual", up: Array = (0.0, 0.0, 1.0),
    focal_px: float = VIRTUAL_FOCAL_PX, image_size: tuple[int, int] = VIRTUAL_IMAGE_SIZE,
) -> Camera:
    """A distortion-free camera at `eye` (world metres) looking at `target`, image `(width, height)` pixels."""
    eye = np.asarray(eye, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - eye
    if np.linalg.norm(forward) < 1e-9:
        raise ValueError("look_at: eye and target coincide")
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(right) < 1e-9:
        raise ValueError("look_at: viewing direction is parallel to `up`")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    width, height = image_size
    return Camera(
        name=name, R=np.stack([right, down, forward], axis=1), t=eye, fx=focal_px, fy=focal_px,
        cx=width / 2, cy=height / 2, width=int(width), height=int(height),
    )


def camera_ring(
    target: Array, n: int = 4, radius_m: float = 5.0, height_m: float = 1.5, start_deg: float = 45.0,
    prefix: str = "virt",
) -> list[Camera]:
    """`n` virtual cameras evenly spaced on a horizontal circle around `target` (world metres, z up), at
    `height_m` above the floor, all looking at `target`; H36M-like intrinsics. Names `<prefix>0..n-1`."""
    target = np.asarray(target, dtype=np.float64)
    cams = []
    for i in range(n):
        a = math.radians(start_deg + 360.0 * i / n)
        eye = np.array([target[0] + radius_m * math.cos(a), target[1] + radius_m * math.sin(a), height_m])
        cams.append(look_at(eye, target, name=f"{prefix}{i}"))
    return cams
