"""Our difference imaging beside its peers on one synthetic pair, each on one core.

Usage: ``python -m benchmarks.bench_diffim_peers [--size 2048] [--peers hotpants sfft
properimage] [--peers-dir /tmp/peers]``. The peers (HOTPANTS built from its C source,
``properimage``'s ZOGY and ``sfft`` from PyPI, in their own virtual environment) are set
up as ``benchmarks/peers/README.md`` says; a peer that is not there is reported and
skipped. They run through ``benchmarks/peers/run_peer.py`` in that environment.

The pair is ``bench_diffim``'s (Gaussian stars, science sigma 2.0 px and noise 10, template
1.5 px and 5, a flux scale of 1.1, a differential background of 3, 50 transients of 3000 in
the science only), written as FITS. Every method's difference (science minus the matched
template, in science units) is judged here by the same numbers:

- ``sub s``: wall seconds of the subtraction alone (no detection), one core;
- ``blank/σ``: robust rms on blank sky (12 px from every source) over the science noise;
  a PSF-matched difference that keeps the template's noise reads
  sqrt(1 + (1.1 x 5 / 10)^2 x sum K^2 / ...) ~ 1.0-1.15;
- ``stars``: at the brightest quarter of the static stars (S/N ~ 200-1300 in the science),
  the rms in a 5-px aperture over the blank rms (1 = nothing left; median, 90th percentile);
- ``transients``: the 50 transients' 8-px aperture flux over their true 3000 (median,
  robust scatter);
- ``vs ours``: robust rms of (difference - ours) on blank sky over our blank rms, i.e. how
  far the two images are apart in units of the noise.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402
from astropy.stats import mad_std  # noqa: E402

from benchmarks.bench_diffim import NOISE_SCIENCE, NOISE_TEMPLATE, build_pair  # noqa: E402

RUNNER = Path(__file__).parent / "peers" / "run_peer.py"
OURS = ("alard_lupton", "zogy")
BORDER = 40  # px left out at the image edges (kernels, FFT wrap-around)


def _ours(directory: Path, method: str) -> tuple[dict[str, float], Path]:
    out = directory / f"ours_{method}.fits"
    cmd = [
        "taskset",
        "-c",
        "0",
        sys.executable,
        "-m",
        "benchmarks.bench_diffim",
        "--one",
        method,
        "--dir",
        str(directory),
        "--save",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return {"wall_s": result["subtract_wall_s"], "cpu_s": result["subtract_cpu_s"]}, out


def _peer(directory: Path, peer: str, peers_dir: Path) -> tuple[dict[str, float], Path] | str:
    """The peer's timing and difference, or why it did not run."""
    python = peers_dir / "venv" / "bin" / "python"
    if not python.exists():
        return f"no {python} (see benchmarks/peers/README.md)"
    if peer == "hotpants" and not (peers_dir / "bin" / "hotpants").exists():
        return f"no {peers_dir / 'bin' / 'hotpants'}"
    out = directory / f"{peer}.fits"
    cmd = [
        "taskset",
        "-c",
        "0",
        str(python),
        str(RUNNER),
        peer,
        str(directory / "science.fits"),
        str(directory / "template.fits"),
        str(out),
        "--science-noise",
        str(NOISE_SCIENCE),
        "--template-noise",
        str(NOISE_TEMPLATE),
        "--peers-dir",
        str(peers_dir),
    ]
    if peer == "sfft":
        cmd.append("--warmup")  # numba's first compilation (~13 s) is not the peer's speed
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines()
        errors = [line for line in lines if "Error" in line or "error" in line]
        return f"failed (exit {run.returncode}): {(errors or lines or [''])[-1]}"
    return json.loads(run.stdout.strip().splitlines()[-1]), out


def _aperture_values(image: np.ndarray, x: np.ndarray, y: np.ndarray, radius: int) -> np.ndarray:
    """(n, pixels) of ``image`` within ``radius`` of each integer-rounded position."""
    d = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    inside = dx**2 + dy**2 <= radius**2
    ix = np.round(x).astype(int)[:, None] + dx[inside][None, :]
    iy = np.round(y).astype(int)[:, None] + dy[inside][None, :]
    return image[iy, ix]


def judge(diff: np.ndarray, data: dict[str, np.ndarray], ours: np.ndarray | None) -> dict:
    """The figures of the module notes for one difference image."""
    ny, nx = diff.shape
    stars, transients = data["stars"], data["transients"]
    sources = np.r_[stars[:, :2], transients[:, :2]]
    near = np.zeros(diff.shape, dtype=bool)
    ix, iy = np.round(sources[:, 0]).astype(int), np.round(sources[:, 1]).astype(int)
    near[iy, ix] = True
    from scipy.ndimage import binary_dilation

    near = binary_dilation(near, iterations=12)
    inner = np.zeros(diff.shape, dtype=bool)
    inner[BORDER : ny - BORDER, BORDER : nx - BORDER] = True
    blank = inner & ~near & np.isfinite(diff)
    level = float(np.median(diff[blank]))
    blank_rms = float(mad_std(diff[blank]))

    def inside(xy: np.ndarray) -> np.ndarray:
        return (
            (xy[:, 0] > BORDER)
            & (xy[:, 0] < nx - BORDER)
            & (xy[:, 1] > BORDER)
            & (xy[:, 1] < ny - BORDER)
        )

    kept = stars[inside(stars)]
    bright = kept[kept[:, 2] >= np.percentile(kept[:, 2], 75)]
    star_rms = np.sqrt(
        np.nanmean((_aperture_values(diff, bright[:, 0], bright[:, 1], 5) - level) ** 2, axis=1)
    )
    tr = transients[inside(transients)]
    flux = np.nansum(_aperture_values(diff, tr[:, 0], tr[:, 1], 8) - level, axis=1) / tr[:, 2]
    out = {
        "blank_over_sigma": blank_rms / NOISE_SCIENCE,
        "star_rms_median": float(np.median(star_rms) / blank_rms),
        "star_rms_p90": float(np.percentile(star_rms, 90) / blank_rms),
        "transient_flux_median": float(np.median(flux)),
        "transient_flux_scatter": float(mad_std(flux)),
        "vs_ours": float("nan"),
    }
    if ours is not None:
        both = blank & np.isfinite(ours)
        out["vs_ours"] = float(mad_std((diff - ours)[both]) / mad_std(ours[both]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--peers", nargs="+", default=["hotpants", "sfft", "properimage"])
    parser.add_argument(
        "--peers-dir", type=Path, default=Path(os.environ.get("DC2_PEERS", "/tmp/peers"))
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        build_pair(args.size, directory)
        data = dict(np.load(directory / "pair.npz"))
        header = fits.Header({"GAIN": 1.0, "SATURATE": 1e9})
        fits.writeto(directory / "science.fits", data["science"], header)
        fits.writeto(directory / "template.fits", data["template"], header)
        print(
            f"{args.size}x{args.size} pair: {len(data['stars'])} stars, "
            f"{len(data['transients'])} transients of 3000; subtraction only, one core"
        )
        print(
            f"{'method':<24}{'sub s':>8}{'blank/σ':>9}{'stars med':>11}{'p90':>6}"
            f"{'transients':>12}{'±':>7}{'vs ours':>9}"
        )
        reference = None
        runs: list[tuple[str, dict[str, float] | str, Path | None]] = []
        for method in OURS:
            timing, path = _ours(directory, method)
            runs.append((f"ours: {method}", timing, path))
        for peer in args.peers:
            got = _peer(directory, peer, args.peers_dir)
            runs.append((peer, got, None) if isinstance(got, str) else (peer, got[0], got[1]))
        for name, timing, path in runs:
            if isinstance(timing, str) or path is None:
                print(f"{name:<24}  skipped: {timing}")
                continue
            diff = fits.getdata(path).astype(np.float64)
            r = judge(diff, data, reference)
            if reference is None:
                reference = diff
            print(
                f"{name:<24}{timing['wall_s']:8.2f}{r['blank_over_sigma']:9.3f}"
                f"{r['star_rms_median']:11.2f}{r['star_rms_p90']:6.2f}"
                f"{r['transient_flux_median']:12.3f}{r['transient_flux_scatter']:7.3f}"
                f"{r['vs_ours']:9.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
