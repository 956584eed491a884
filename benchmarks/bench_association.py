"""Time and memory of association, and of DIA forced photometry on a 4k x 4k CCD.

Usage: ``python -m benchmarks.bench_association [--sources 1000000] [--visits 1000]
[--methods bipartite sequential cluster] [--forced 10000]``.

Association: one patch (840" square, like a 4200^2 patch at 0.2") with
``--sources`` synthetic DIASources over ``--visits`` visits: 80% of each visit's
sources are detections of persistent objects (each seen with probability
0.8, position errors 0.03-0.2"), the rest false positives at random places
(each its own DIAObject), so the object count grows through the run as in a
real survey. Each method runs in a fresh process; reported: wall and CPU
seconds of ``associate`` alone, the process's peak RSS (it includes the
~0.3 GB of the inputs and imports) and, against the synthetic truth, the
fraction of true objects whose detections form exactly one DIAObject, the
split ones, the DIAObjects holding two true objects and the false detections
joined to true objects. Goal (default
method): <= 20 s, <= 2 GB.

Forced photometry: ``--forced`` DIAObject positions on a 4096^2 difference
image and its calexp (noise, a PSF model of 0.8" FWHM): the time of the two
``forced_photometry`` calls (goal <= 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import pandas as pd

PATCH_ARCSEC = 840.0


def synthetic_dia_sources(n_sources: int, n_visits: int, seed: int = 0) -> pd.DataFrame:
    """The association input: x, y (arcsec), err, epoch, visit, rank, can_seed."""
    rng = np.random.default_rng(seed)
    per_visit = n_sources // n_visits
    n_real = per_visit  # objects, each seen with probability 0.8: 80% of a visit's sources
    n_false = per_visit - int(0.8 * n_real)
    truth = rng.uniform(0, PATCH_ARCSEC, (n_real, 2))
    err_true = rng.uniform(0.03, 0.2, n_real)
    xs, ys, errs, visits, truths = [], [], [], [], []
    for visit in range(n_visits):
        seen = np.flatnonzero(rng.random(n_real) < 0.8)
        pos = truth[seen] + rng.normal(size=(len(seen), 2)) * err_true[seen, None]
        fp = rng.uniform(0, PATCH_ARCSEC, (n_false, 2))
        xs.append(np.r_[pos[:, 0], fp[:, 0]])
        ys.append(np.r_[pos[:, 1], fp[:, 1]])
        errs.append(np.r_[err_true[seen], rng.uniform(0.05, 0.3, n_false)])
        visits.append(np.full(len(seen) + n_false, visit))
        truths.append(np.r_[seen, np.full(n_false, -1)])
    visit = np.concatenate(visits)
    return pd.DataFrame(
        {
            "x": np.concatenate(xs),
            "y": np.concatenate(ys),
            "err": np.concatenate(errs),
            "visit": visit,
            "epoch": 60000.0 + visit * 0.7,
            "rank": np.arange(len(visit), dtype=np.int64),
            "can_seed": True,
            "truth": np.concatenate(truths),
        }
    )


def truth_figures(truth: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per true object: in exactly one DIAObject, split; DIAObjects holding two true
    objects; false detections that joined a true object's (main) DIAObject."""
    real = truth >= 0
    pairs = pd.DataFrame({"truth": truth[real], "label": labels[real]})
    per_truth = pairs.groupby("truth")["label"].nunique()
    per_label = pairs.groupby("label")["truth"].nunique()
    main = pairs.groupby("truth")["label"].agg(lambda s: s.value_counts().index[0])
    false_in_true = np.isin(labels[~real], main.to_numpy()).sum()
    return {
        "true_in_one_object": round(float((per_truth == 1).mean()), 4),
        "true_split": int((per_truth > 1).sum()),
        "objects_merging_two_true": int((per_label > 1).sum()),
        "false_detections_in_true_objects": int(false_in_true),
    }


def _child(method: str, n_sources: int, n_visits: int) -> None:
    from workflow_lib.association.associate import AssociationConfig, associate

    table = synthetic_dia_sources(n_sources, n_visits)
    cols = [table[c].to_numpy() for c in ("x", "y", "err", "epoch", "visit", "rank", "can_seed")]
    wall, cpu = time.perf_counter(), time.process_time()
    labels = associate(*cols, AssociationConfig(method=method))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    quality = truth_figures(table["truth"].to_numpy(), labels)
    print(
        json.dumps(
            {
                "method": method,
                "n_sources": len(table),
                "n_visits": n_visits,
                "n_objects": int(labels.max()) + 1,
                "wall_s": round(wall, 2),
                "cpu_s": round(cpu, 2),
                "peak_rss_mb": round(peak_mb),
                **quality,
            }
        )
    )


def forced_benchmark(n_positions: int, seed: int = 1) -> dict[str, float]:
    from astropy.wcs import WCS

    from workflow_lib.core.exposure import Exposure, MaskPlanes
    from workflow_lib.core.psf_model import PsfModel
    from workflow_lib.objects.forced import forced_photometry

    rng = np.random.default_rng(seed)
    n = 4096
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [56.0, -30.0]
    wcs.wcs.crpix = [n / 2, n / 2]
    wcs.wcs.cd = [[-0.2 / 3600, 0], [0, 0.2 / 3600]]
    yy, xx = np.mgrid[-12:13, -12:13]
    kernel = np.exp(-(xx**2 + yy**2) / (2 * (4.0 / 2.3548) ** 2))
    psf = PsfModel.constant(kernel / kernel.sum())
    images = []
    for _ in range(2):
        image = rng.normal(0, 10.0, (n, n)).astype(np.float32)
        images.append(
            Exposure(
                image=image,
                variance=np.full((n, n), 100.0, np.float32),
                mask=np.zeros((n, n), np.int32),
                mask_planes=MaskPlanes(),
                wcs=wcs,
                psf=psf,
            )
        )
    x, y = rng.uniform(20, n - 20, n_positions), rng.uniform(20, n - 20, n_positions)
    ra, dec = wcs.all_pix2world(x, y, 0)
    objects = pd.DataFrame({"diaObjectId": np.arange(n_positions), "ra": ra, "dec": dec})
    wall = time.perf_counter()
    for exposure in images:
        forced_photometry(
            exposure,
            objects,
            id_column="diaObjectId",
            aperture_correction=None,
            visit=1,
            detector=0,
            band="r",
            midpoint_mjd=60000.0,
        )
    return {
        "forced_positions": n_positions,
        "forced_two_images_wall_s": round(time.perf_counter() - wall, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=1_000_000)
    parser.add_argument("--visits", type=int, default=1000)
    parser.add_argument("--methods", nargs="+", default=["bipartite", "sequential", "cluster"])
    parser.add_argument("--forced", type=int, default=10_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.sources, args.visits)
        return
    for method in args.methods:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_association",
                "--child",
                method,
                "--sources",
                str(args.sources),
                "--visits",
                str(args.visits),
            ],
            check=True,
        )
    if args.forced:
        print(json.dumps(forced_benchmark(args.forced)))


if __name__ == "__main__":
    main()
