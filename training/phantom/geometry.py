"""Level functions and soft-edge compositing shared by the phantom's anatomy and lesions.

Every structure is described by a *level function* g (millimetres, negative inside, zero on the
boundary, roughly the signed distance). A structure's voxel fraction is ``ramp(g, w)``: a linear
ramp of width ``w`` across the boundary. That is the exact convolution of the ideal shape with a
box point-spread function of width ``w`` along the boundary normal, which is how the
reconstruction kernel's blur and the partial-volume effect are modelled without a separate 3D
filter pass. Union is ``min`` of level functions, intersection ``max``, complement ``-g``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float32]
AnyArray = NDArray[Any]  # coordinates may come as float32 grids or float64 points


def ramp(g: AnyArray, width: float) -> FloatArray:
    """Fraction inside (0..1) of a level function ``g`` with an edge of ``width`` mm."""
    out: FloatArray = np.asarray(g, dtype=np.float32) * np.float32(-1.0 / width)
    out += np.float32(0.5)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def paint(img: FloatArray, fraction: FloatArray, hu: float | FloatArray) -> None:
    """Alpha-composite ``hu`` over ``img`` in place with ``fraction`` as alpha."""
    img += fraction * (hu - img)


def ellipse_level(x: AnyArray, y: AnyArray, a: float, b: float) -> FloatArray:
    """Radial level function of an axis-aligned ellipse centred at the origin (2D)."""
    r = np.sqrt(x * x + y * y, dtype=np.float32)
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2, dtype=np.float32)
    np.maximum(rho, 1e-6, out=rho)
    return np.asarray(r * (1.0 - 1.0 / rho), dtype=np.float32)


def ellipsoid_level(
    dx: AnyArray,
    dy: AnyArray,
    dz: AnyArray | float,
    rotation: AnyArray,
    semi_axes: tuple[float, float, float],
) -> FloatArray:
    """Radial level function of a rotated ellipsoid; ``d*`` are offsets from its centre (mm).

    ``rotation`` has the ellipsoid's axes as rows, so local = rotation @ offset.
    """
    lx = rotation[0, 0] * dx + rotation[0, 1] * dy + rotation[0, 2] * dz
    ly = rotation[1, 0] * dx + rotation[1, 1] * dy + rotation[1, 2] * dz
    lz = rotation[2, 0] * dx + rotation[2, 1] * dy + rotation[2, 2] * dz
    r = np.sqrt(lx * lx + ly * ly + lz * lz)
    rho = np.sqrt((lx / semi_axes[0]) ** 2 + (ly / semi_axes[1]) ** 2 + (lz / semi_axes[2]) ** 2)
    np.maximum(rho, 1e-6, out=rho)
    return np.asarray(r * (1.0 - 1.0 / rho), dtype=np.float32)


def capsule_level(
    dx: AnyArray,
    dy: AnyArray,
    dz: AnyArray | float,
    axis: AnyArray,
    r0: float,
    r1: float,
) -> FloatArray:
    """Level function of a tapered capsule from the origin to ``axis`` (offsets in mm).

    The radius goes linearly from ``r0`` at the start to ``r1`` at the end: a vessel or airway
    segment, or a spicule.
    """
    length2 = float(axis @ axis)
    if length2 < 1e-12:
        return np.asarray(np.sqrt(dx * dx + dy * dy + dz * dz) - r0, dtype=np.float32)
    t = (dx * axis[0] + dy * axis[1] + dz * axis[2]) * (1.0 / length2)
    t = np.clip(t, 0.0, 1.0)
    ex = dx - t * axis[0]
    ey = dy - t * axis[1]
    ez = dz - t * axis[2]
    dist = np.sqrt(ex * ex + ey * ey + ez * ez)
    return np.asarray(dist - (r0 + (r1 - r0) * t), dtype=np.float32)


def smoothstep(v: AnyArray | float, lo: float, hi: float) -> AnyArray:
    """Hermite step from 0 at ``lo`` to 1 at ``hi``."""
    t = np.clip((np.asarray(v) - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def rotation_matrix(rng: np.random.Generator) -> NDArray[np.float64]:
    """A uniformly random 3D rotation (rows are the rotated axes)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return np.asarray(q.T)


def random_unit_vectors(rng: np.random.Generator, n: int) -> NDArray[np.float64]:
    """``n`` directions uniformly distributed on the unit sphere, shape (n, 3)."""
    v = rng.standard_normal((n, 3))
    return np.asarray(v / np.linalg.norm(v, axis=1, keepdims=True))


def fibonacci_sphere(n: int) -> NDArray[np.float64]:
    """``n`` nearly evenly spaced unit vectors, shape (n, 3), for surface probing."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1.0 - 2.0 * i / n)
    theta = np.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)
