"""Run one peer image-subtraction tool on a science/template pair (for bench_diffim_peers).

Runs in the peers' own environment, not the project's (see README.md here):

  PEERS/venv/bin/python run_peer.py PEER science.fits template.fits out_diff.fits
      [--peers-dir PEERS] [--science-noise S] [--template-noise T] [--threads 1]
      [--warmup] [--keep-workdir] [--extras] [--hp-extra "-r 12 -rss 18"]
      [--sfft-flavor sparse|crowded]

PEER: hotpants | properimage | sfft. Writes out_diff.fits (float32 primary HDU) =
science - PSF-matched template, in the science's flux units (for properimage ZOGY's D
rescaled to science flux units; its PSF is ZOGY's P_D, not the science PSF); invalid
pixels are NaN. Prints one JSON line {"peer", "wall_s", "cpu_s", ...} timing only the
peer's own work (and the little glue that cannot be separated from it).
"""

import argparse
import json
import os
import sys


def parse():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("peer", choices=["hotpants", "properimage", "sfft"])
    p.add_argument("science")
    p.add_argument("template")
    p.add_argument("out_diff")
    p.add_argument(
        "--science-noise",
        type=float,
        default=None,
        help="per-pixel noise sigma of the science image (default: robust MAD estimate)",
    )
    p.add_argument(
        "--template-noise",
        type=float,
        default=None,
        help="per-pixel noise sigma of the template image (default: robust MAD estimate)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="threads for BLAS/FFTW/numba/sfft (default 1)"
    )
    p.add_argument(
        "--warmup",
        action="store_true",
        help="run the peer once untimed first (numba JIT / FFTW plans / page cache)",
    )
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument(
        "--extras",
        action="store_true",
        help="properimage: also write PSF_D and S_CORR image extensions",
    )
    p.add_argument(
        "--hp-extra", default="", help="extra hotpants flags appended to the default command line"
    )
    p.add_argument(
        "--sfft-flavor",
        choices=["sparse", "crowded"],
        default="sparse",
        help="sparse: SExtractor sky-subtraction + Easy_SparsePacket (default); "
        "crowded: Easy_CrowdedPacket with BGPolyOrder=2 on the raw images",
    )
    p.add_argument("--verbose", action="store_true")
    p.add_argument(
        "--peers-dir",
        default=os.environ.get("DC2_PEERS", "/tmp/peers"),
        help="where bin/hotpants, bin/sex and the numba cache are ($DC2_PEERS, /tmp/peers)",
    )
    return p.parse_args()


ARGS = parse()
PEERS_DIR = os.path.abspath(ARGS.peers_dir)
HOTPANTS = os.path.join(PEERS_DIR, "bin", "hotpants")
# thread limits must be in the environment before numpy / numba / pyfftw load
_t = str(ARGS.threads)
for _k in (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "PYFFTW_NUM_THREADS",
):
    os.environ[_k] = _t
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(PEERS_DIR, "numba_cache"))
# sfft looks for SExtractor as `sex` or `sextractor`; Debian names it `source-extractor`
os.environ["PATH"] = os.path.join(PEERS_DIR, "bin") + os.pathsep + os.environ.get("PATH", "")

import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402

warnings.filterwarnings("ignore")


class Timer:
    """wall + CPU (this process and waited-for children, e.g. hotpants/SExtractor)."""

    def __init__(self):
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self):
        self._w = time.perf_counter()
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._c = s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
        return self

    def __exit__(self, *exc):
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.wall += time.perf_counter() - self._w
        self.cpu += s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime - self._c
        return False


def read_image(path):
    with fits.open(path) as h:
        data = np.asarray(h[0].data, dtype=np.float32)
        hdr = h[0].header.copy()
    if data.ndim != 2:
        raise SystemExit(f"{path}: primary HDU is not a 2-D image")
    return data, hdr


def robust_sigma(a):
    a = a[np.isfinite(a)]
    for _ in range(3):
        med = np.median(a)
        s = 1.4826 * np.median(np.abs(a - med))
        a = a[np.abs(a - med) < 3 * s]
    return float(1.4826 * np.median(np.abs(a - np.median(a))))


def write_diff(path, diff, hdr=None, extra_hdus=()):
    h = fits.Header()
    if hdr is not None:
        for k, v in hdr.items():
            if k not in (
                "SIMPLE",
                "BITPIX",
                "NAXIS",
                "NAXIS1",
                "NAXIS2",
                "EXTEND",
                "BSCALE",
                "BZERO",
                "COMMENT",
                "HISTORY",
                "",
            ):
                try:
                    h[k] = v
                except Exception:
                    pass
    hl = fits.HDUList(
        [fits.PrimaryHDU(np.asarray(diff, dtype=np.float32), header=h), *list(extra_hdus)]
    )
    hl.writeto(path, overwrite=True)


# --------------------------------------------------------------------------- hotpants
def run_hotpants(sci_path, tmpl_path, out_path, s_noise, t_noise, workdir, timer, info):
    # hotpants' noise model: var = |data|/gain + (rdnoise/gain)^2 (ADU).  A huge gain makes
    # the Poisson term negligible, so rdnoise = sigma*gain gives a flat noise of sigma ADU.
    g = 1.0e4
    raw = os.path.join(workdir, "hp_diff.fits")
    # -c t: convolve the template; -n i: the difference in the science's units; the
    # valid ranges opened (the defaults flag negative noise and anything above 25000).
    cmd = [
        HOTPANTS,
        "-inim",
        sci_path,
        "-tmplim",
        tmpl_path,
        "-outim",
        raw,
        "-tu",
        "1e9",
        "-tl",
        "-1e9",
        "-iu",
        "1e9",
        "-il",
        "-1e9",
        "-n",
        "i",
        "-c",
        "t",
        "-ig",
        repr(g),
        "-ir",
        repr(s_noise * g),
        "-tg",
        repr(g),
        "-tr",
        repr(t_noise * g),
        "-v",
        "0",
        *shlex.split(ARGS.hp_extra),
    ]
    info["cmd"] = " ".join(shlex.quote(c) for c in cmd)
    log = open(os.path.join(workdir, "hotpants.log"), "w")
    with timer:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    if rc != 0 or not os.path.exists(raw):
        sys.stderr.write(open(os.path.join(workdir, "hotpants.log")).read()[-3000:])
        raise SystemExit(f"hotpants failed rc={rc}")
    with fits.open(raw) as h:
        d = np.asarray(h[0].data, dtype=np.float32)
        hdr = h[0].header.copy()
    fill = float(hdr.get("MASKVAL", 1e-30))
    bad = (d == np.float32(fill)) | ~np.isfinite(d)
    d[bad] = np.nan
    info["ksum"] = float(hdr.get("KSUM00", np.nan))
    info["n_nan"] = int(bad.sum())
    keep = {
        k: hdr[k]
        for k in hdr
        if k.startswith(
            ("KSUM", "SSSIG", "SSSCAT", "CONVOL", "PHOTNORM", "NREGION", "X2NRM", "NSCALO")
        )
    }
    return d, keep


# --------------------------------------------------------------------------- properimage
def run_properimage(sci, tmpl, s_noise_given, t_noise_given, timer, info):
    from properimage import operations as op
    from properimage.single_image import SingleImageGaussPSF

    class _SI(SingleImageGaussPSF):
        """SingleImageGaussPSF using the given noise sigma (if any), keeping its PSF model."""

        noise = None

        @property
        def var(self):  # properimage calls the noise *sigma* `var` (sep globalrms by default)
            return self.noise if self.noise is not None else self._bkg.globalrms

        def get_variable_psf(self, inf_loss=None, shape=None):
            r = super().get_variable_psf(inf_loss, shape)
            self._psf_model = r[1][1]
            return r

    # record properimage's fitted flux ratio beta (not returned by subtract())
    class _Opt:
        def __init__(self, mod):
            self._m = mod
            self.last = None

        def __getattr__(self, k):
            return getattr(self._m, k)

        def least_squares(self, *a, **k):
            r = self._m.least_squares(*a, **k)
            self.last = r
            return r

    rec = _Opt(op.optimize)
    op.optimize = rec
    try:
        with timer:
            ref = _SI(tmpl, smooth_psf=False)
            new = _SI(sci, smooth_psf=False)
            ref.noise, new.noise = t_noise_given, s_noise_given
            D, P, S_corr, mix_mask = op.subtract(
                ref=ref,
                new=new,
                align=False,
                smooth_psf=False,
                beta=True,
                shift=True,
                iterative=False,
                fitted_psf=True,
            )
        # ---- conversion to science flux units (outside timing)
        r = rec.last
        if r is not None and r.success:
            b = float(np.atleast_1d(r.x)[0])
        else:
            b = float(new.zp / ref.zp)
        mr, mn = ref._psf_model, new._psf_model
        a_r = 2 * np.pi * mr.x_stddev.value * mr.y_stddev.value  # sum of amplitude-1 Gaussian PSF
        a_n = 2 * np.pi * mn.x_stddev.value * mn.y_stddev.value
        b_eff = b * a_n / a_r  # flux ratio science/template for unit-sum PSFs
        s_n, s_r = float(new.var), float(ref.var)
        scale = np.sqrt(s_n**2 + b_eff**2 * s_r**2)
        diff = (D.real * scale).astype(np.float32)
        if mix_mask is not np.ma.nomask and np.any(mix_mask):
            diff[np.asarray(mix_mask, bool)] = np.nan
        info.update(
            beta_raw=b,
            flux_ratio=b_eff,
            sigma_sci=s_n,
            sigma_tmpl=s_r,
            d_scale=float(scale),
            psf_sigma_sci=[float(mn.x_stddev.value), float(mn.y_stddev.value)],
            psf_sigma_tmpl=[float(mr.x_stddev.value), float(mr.y_stddev.value)],
        )
        extras = []
        if ARGS.extras:
            extras = [
                fits.ImageHDU(np.asarray(P, np.float32), name="PSF_D"),
                fits.ImageHDU(np.asarray(S_corr, np.float32), name="S_CORR"),
            ]
        keep = {"PI_BETA": b, "PI_FRAT": b_eff, "PI_DSCAL": float(scale)}
        ref._clean()
        new._clean()
    finally:
        op.optimize = rec._m
    return diff, keep, extras


# --------------------------------------------------------------------------- sfft
def run_sfft(sci, shdr, tmpl, thdr, workdir, timer, info):
    from sfft.EasyCrowdedPacket import Easy_CrowdedPacket
    from sfft.EasySparsePacket import Easy_SparsePacket
    from sfft.utils.SExSkySubtract import SEx_SkySubtract

    # sfft needs FITS files on disk with GAIN / SATURATE keywords, and ABSOLUTE paths
    # (it runs SExtractor after cd-ing into a temp dir).
    paths = {}
    for name, data, hdr in (("sci", sci, shdr), ("tmpl", tmpl, thdr)):
        h = fits.Header()
        h["GAIN"] = float(hdr.get("GAIN", 1.0))
        h["SATURATE"] = float(hdr.get("SATURATE", 1.0e30))
        h["ESATUR"] = h["SATURATE"]
        p = os.path.join(workdir, name + ".fits")
        fits.writeto(p, data.astype(np.float32), h, overwrite=True)
        paths[name] = os.path.abspath(p)
    nthr = ARGS.threads
    vl = 1 if ARGS.verbose else 0
    # What both flavours are given alike: the template convolved (science - K * template in
    # the science's units), a kernel polynomial of order 2, one photometric ratio.
    common = dict(
        FITS_DIFF=None,
        ForceConv="REF",
        GKerHW=None,
        KerHWRatio=2.0,
        KerPolyOrder=2,
        ConstPhotRatio=True,
        GAIN_KEY="GAIN",
        BACKEND_4SUBTRACT="Numpy",
        NUM_CPU_THREADS_4SUBTRACT=nthr,
        VERBOSE_LEVEL=vl,
    )
    with timer:
        if ARGS.sfft_flavor == "sparse":
            # the sparse flavour wants sky-subtracted inputs: sfft's own SExtractor sky
            ss = {}
            for name in ("tmpl", "sci"):
                ss[name] = os.path.join(workdir, name + "_skysub.fits")
                SEx_SkySubtract.SSS(
                    FITS_obj=paths[name],
                    FITS_skysub=ss[name],
                    SATUR_KEY="SATURATE",
                    ESATUR_KEY="ESATUR",
                    BACK_SIZE=64,
                    BACK_FILTERSIZE=3,
                    DETECT_THRESH=1.5,
                    VERBOSE_LEVEL=vl,
                    MDIR=workdir,
                )
            res = Easy_SparsePacket.ESP(
                FITS_REF=ss["tmpl"],
                FITS_SCI=ss["sci"],
                BGPolyOrder=0,
                SATUR_KEY="ESATUR",
                **common,
            )
        else:
            res = Easy_CrowdedPacket.ECP(
                FITS_REF=paths["tmpl"],
                FITS_SCI=paths["sci"],
                BGPolyOrder=2,
                SATUR_KEY="SATURATE",
                **common,
            )
    PixA_DIFF, prep, _solution, fscal, _fscal_sig = res
    diff = np.asarray(PixA_DIFF.T, dtype=np.float32)  # sfft arrays are (x, y): transpose back
    info.update(
        flux_ratio=float(fscal),
        fwhm_sci=float(prep["FWHM_SCI"]),
        fwhm_tmpl=float(prep["FWHM_REF"]),
        flavor=ARGS.sfft_flavor,
    )
    keep = {"SF_FSCAL": float(fscal), "SF_FLAV": ARGS.sfft_flavor}
    return diff, keep


# --------------------------------------------------------------------------- main
def main():
    # the peers print progress on stdout (sfft even at VERBOSE_LEVEL=0, SExtractor too):
    # send fd 1 to stderr while they run so that stdout carries only the JSON line
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        out = _main()
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    print(json.dumps(out), flush=True)


def _main():
    sci, shdr = read_image(ARGS.science)
    tmpl, thdr = read_image(ARGS.template)
    if sci.shape != tmpl.shape:
        raise SystemExit("science and template shapes differ")
    s_noise = ARGS.science_noise if ARGS.science_noise is not None else robust_sigma(sci)
    t_noise = ARGS.template_noise if ARGS.template_noise is not None else robust_sigma(tmpl)
    workdir = tempfile.mkdtemp(
        prefix=f"run_{ARGS.peer}_", dir=os.path.dirname(os.path.abspath(ARGS.out_diff))
    )
    info = {}
    extras = []
    tempfile.tempdir = workdir  # sfft's SExtractor scratch dirs (MDIR=None -> mkdtemp) land here
    try:
        nrun = 2 if ARGS.warmup else 1
        for _i in range(nrun):
            timer = Timer()  # only the last (timed) run is reported
            info = {}
            if ARGS.peer == "hotpants":
                # hotpants reads the FITS itself; give it float32 primary-HDU copies only if needed
                sp, tp = os.path.abspath(ARGS.science), os.path.abspath(ARGS.template)
                if shdr.get("BITPIX") != -32 or thdr.get("BITPIX") != -32 or shdr.get("NAXIS") != 2:
                    sp, tp = os.path.join(workdir, "sci.fits"), os.path.join(workdir, "tmpl.fits")
                    fits.writeto(sp, sci, overwrite=True)
                    fits.writeto(tp, tmpl, overwrite=True)
                diff, keep = run_hotpants(
                    sp, tp, ARGS.out_diff, s_noise, t_noise, workdir, timer, info
                )
            elif ARGS.peer == "properimage":
                diff, keep, extras = run_properimage(
                    sci, tmpl, ARGS.science_noise, ARGS.template_noise, timer, info
                )
            else:
                diff, keep = run_sfft(sci, shdr, tmpl, thdr, workdir, timer, info)
        hdr = fits.Header()
        for k, v in keep.items():
            hdr[k[:8]] = v
        hdr["PEER"] = ARGS.peer
        hdr["DIFFCONV"] = ("SCI - K*TMPL", "science minus PSF-matched template")
        hdr["FLUXUNIT"] = ("SCIENCE", "difference in science-image flux units")
        write_diff(ARGS.out_diff, diff, hdr, extras)
    finally:
        if not ARGS.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            info["workdir"] = workdir
    out = {
        "peer": ARGS.peer,
        "wall_s": round(timer.wall, 4),
        "cpu_s": round(timer.cpu, 4),
        "threads": ARGS.threads,
        "science_noise": s_noise,
        "template_noise": t_noise,
    }
    out.update(info)
    return out


if __name__ == "__main__":
    main()
