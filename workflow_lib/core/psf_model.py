"""The PSF model every stage evaluates (POLYPIX).

``PsfModel`` is a pixelized kernel whose pixels vary as a polynomial over the
image (the PSFEx representation): kernel(x, y) = sum_k P_k(u, v) basis[k] with
u = (x - x_center) / x_scale, v = (y - y_center) / y_scale and P_k the
monomials u^i v^j ordered by total degree (1, u, v, u^2, u v, v^2, ...). All
kernels share one odd size, as PSF matching needs fixed-size kernels.

A fitted model is only known where its stars are: positions outside the
stars' bounding box (``fit_box``) are evaluated at the nearest point of the
box, because a quadratic extrapolated into an empty CCD corner can put a tenth
of the kernel's flux into negative pixels.

On disk it is a FITS image cube (HDU ``PSF``) with cards PSFTYPE='POLYPIX',
PSFORDER, PSFXC, PSFYC, PSFXS, PSFYS and, when the model has a fit box,
PSFXMIN, PSFXMAX, PSFYMIN, PSFYMAX (x and y are clipped to them before u and v
are formed), so it can be evaluated from astropy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def monomial_exponents(order: int) -> list[tuple[int, int]]:
    """(i, j) exponents of u^i v^j, by total degree: (0,0), (1,0), (0,1), (2,0), ..."""
    return [(degree - j, j) for degree in range(order + 1) for j in range(degree + 1)]


@dataclass(frozen=True)
class PsfModel:
    """Spatially varying pixelized PSF; kernels are normalised to unit sum."""

    basis: np.ndarray  # (n_terms, size, size)
    order: int = 0
    x_center: float = 0.0
    y_center: float = 0.0
    x_scale: float = 1.0
    y_scale: float = 1.0
    # (x_min, x_max, y_min, y_max): where the fit had stars; None = everywhere.
    fit_box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        basis = np.asarray(self.basis, dtype=np.float64)
        if basis.ndim == 2:
            basis = basis[None]
        n_terms = len(monomial_exponents(self.order))
        if basis.ndim != 3 or basis.shape[0] != n_terms:
            raise ValueError(f"PSF basis of shape {basis.shape} does not fit order {self.order}")
        if basis.shape[1] != basis.shape[2] or basis.shape[1] % 2 == 0:
            raise ValueError(f"PSF kernels must be square with odd size, got {basis.shape[1:]}")
        if self.x_scale <= 0 or self.y_scale <= 0:
            raise ValueError("PSF polynomial scales must be positive")
        if self.fit_box is not None:
            x0, x1, y0, y1 = (float(b) for b in self.fit_box)
            if not (x0 <= x1 and y0 <= y1):
                raise ValueError(f"PSF fit box {self.fit_box} is empty")
            object.__setattr__(self, "fit_box", (x0, x1, y0, y1))
        object.__setattr__(self, "basis", basis)

    @classmethod
    def constant(cls, kernel: np.ndarray) -> PsfModel:
        """A PSF that is the same everywhere."""
        kernel = np.asarray(kernel, dtype=np.float64)
        return cls(basis=(kernel / kernel.sum())[None], order=0)

    @property
    def size(self) -> int:
        return int(self.basis.shape[1])

    def normalized_position(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) of the polynomial at pixel positions, clipped to the fit box."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if self.fit_box is not None:
            x0, x1, y0, y1 = self.fit_box
            x, y = np.clip(x, x0, x1), np.clip(y, y0, y1)
        return (x - self.x_center) / self.x_scale, (y - self.y_center) / self.y_scale

    def kernel_at(self, x: float, y: float) -> np.ndarray:
        """The PSF image centred on the kernel's central pixel, summing to 1."""
        u, v = self.normalized_position(x, y)
        weights = polynomial_terms(u, v, self.order)[0]
        kernel = np.tensordot(weights, self.basis, axes=1)
        total = kernel.sum()
        if not np.isfinite(total) or total <= 0:
            raise ValueError(f"PSF model evaluates to a non-positive kernel at ({x}, {y})")
        return kernel / total

    def fwhm_at(self, x: float, y: float) -> float:
        """FWHM in pixels, from the area above half maximum (exact for any profile shape)."""
        kernel = self.kernel_at(x, y)
        return fwhm_of_image(kernel)

    def header_cards(self) -> list[tuple[str, object, str]]:
        return [
            ("PSFTYPE", "POLYPIX", "pixelized kernel, polynomial in position"),
            ("PSFORDER", self.order, "polynomial order"),
            ("PSFXC", self.x_center, "u = (x - PSFXC) / PSFXS, 0-based pixels"),
            ("PSFYC", self.y_center, "v = (y - PSFYC) / PSFYS"),
            ("PSFXS", self.x_scale, ""),
            ("PSFYS", self.y_scale, ""),
            ("COMMENT", "kernel = sum_k u^i v^j PLANE_k, (i,j) by total degree, then /sum", ""),
            *self._fit_box_cards(),
        ]

    def _fit_box_cards(self) -> list[tuple[str, object, str]]:
        if self.fit_box is None:
            return []
        x0, x1, y0, y1 = self.fit_box
        return [
            ("PSFXMIN", x0, "x clipped to [PSFXMIN, PSFXMAX] for u"),
            ("PSFXMAX", x1, "(the model's stars' extent)"),
            ("PSFYMIN", y0, "y clipped to [PSFYMIN, PSFYMAX]"),
            ("PSFYMAX", y1, ""),
        ]

    @classmethod
    def from_header_and_cube(cls, header: Any, cube: np.ndarray) -> PsfModel:
        """The model from its header cards (a FITS header or a dict: anything with
        ``get``) and its basis cube."""
        get = header.get
        if str(get("PSFTYPE", "POLYPIX")).strip() != "POLYPIX":
            raise ValueError(f"unsupported PSF type {get('PSFTYPE')!r}")
        return cls(
            basis=np.asarray(cube, dtype=np.float64),
            order=int(get("PSFORDER", 0)),
            x_center=float(get("PSFXC", 0.0)),
            y_center=float(get("PSFYC", 0.0)),
            x_scale=float(get("PSFXS", 1.0)),
            y_scale=float(get("PSFYS", 1.0)),
            fit_box=(
                (
                    float(get("PSFXMIN")),
                    float(get("PSFXMAX")),
                    float(get("PSFYMIN")),
                    float(get("PSFYMAX")),
                )
                if get("PSFXMIN") is not None
                else None
            ),
        )


def fwhm_of_image(kernel: np.ndarray, *, oversample: int = 16) -> float:
    """FWHM (pixels) of a centred PSF image from the area above half maximum.

    The kernel is resampled by cubic splines on a grid ``oversample`` times
    finer so that the pixelised area converges; FWHM = 2 sqrt(area / pi),
    exact for a circular profile of any radial shape.
    """
    from scipy.ndimage import map_coordinates

    kernel = np.asarray(kernel, dtype=np.float64)
    ny, nx = kernel.shape
    step = 1.0 / oversample
    yy, xx = np.meshgrid(
        np.arange(0, ny - 1 + step / 2, step), np.arange(0, nx - 1 + step / 2, step), indexing="ij"
    )
    fine = map_coordinates(kernel, [yy, xx], order=3, mode="nearest")
    area = np.count_nonzero(fine >= 0.5 * fine.max()) * step**2
    return float(2.0 * np.sqrt(area / np.pi))


def polynomial_terms(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    """Monomials (n, n_terms) of PsfModel's ordering at normalised (u, v)."""
    u = np.atleast_1d(np.asarray(u, dtype=np.float64))
    v = np.atleast_1d(np.asarray(v, dtype=np.float64))
    return np.stack([u**i * v**j for i, j in monomial_exponents(order)], axis=1)


def polynomial_image(
    coefficients: np.ndarray, order: int, u_row: np.ndarray, v_col: np.ndarray
) -> np.ndarray:
    """sum_k coefficients[k] u^i v^j over an image, from its normalised coordinates along a
    row (``u_row``, nx) and a column (``v_col``, ny): one outer product per monomial, no
    (npix, nterms) design over the whole image (2 s on a 4k CCD)."""
    u = np.asarray(u_row, dtype=np.float64).ravel()
    v = np.asarray(v_col, dtype=np.float64).ravel()
    out = np.zeros((v.size, u.size))
    for c, (i, j) in zip(coefficients, monomial_exponents(order), strict=True):
        out += c * np.outer(v**j, u**i)
    return out


def fit_psf_model(
    x: np.ndarray,
    y: np.ndarray,
    kernels: np.ndarray,
    order: int,
    shape: tuple[int, int],
    weights: np.ndarray | None = None,
) -> PsfModel:
    """The POLYPIX model of ``order`` that best fits ``kernels`` (n, s, s) known at pixel
    positions (x, y) of an image of ``shape`` (ny, nx): a (weighted) least-squares fit of
    every kernel pixel, the polynomial centred on the image and scaled to its half-sizes."""
    ny, nx = shape
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    xs, ys = max(nx / 2.0, 1.0), max(ny / 2.0, 1.0)
    terms = polynomial_terms((np.asarray(x) - xc) / xs, (np.asarray(y) - yc) / ys, order)
    flat = np.asarray(kernels, dtype=np.float64).reshape(len(terms), -1)
    if weights is not None:
        sqrt_w = np.sqrt(np.asarray(weights, dtype=np.float64))[:, None]
        terms, flat = terms * sqrt_w, flat * sqrt_w
    coef, *_ = np.linalg.lstsq(terms, flat, rcond=None)
    size = kernels.shape[-1]
    return PsfModel(
        basis=coef.reshape(-1, size, size),
        order=order,
        x_center=xc,
        y_center=yc,
        x_scale=xs,
        y_scale=ys,
    )


def evaluate_kernels(psf: PsfModel, x: np.ndarray, y: np.ndarray, *, half: int | None = None):
    """Kernels at many positions (n, s, s), each normalised by its full-kernel sum.

    ``half`` crops to the central (2 half + 1)^2 pixels *after* normalising,
    so a cropped kernel still carries the full model's flux scale.
    """
    u, v = psf.normalized_position(x, y)
    terms = polynomial_terms(u, v, psf.order)
    totals = terms @ psf.basis.sum(axis=(1, 2))
    c = psf.size // 2
    h = c if half is None else min(int(half), c)
    basis = psf.basis[:, c - h : c + h + 1, c - h : c + h + 1]
    kernels = np.tensordot(terms, basis, axes=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernels /= totals[:, None, None]
    return kernels
