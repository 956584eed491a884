"""The report's figures: arrays and tables in, a matplotlib ``Figure`` out (no files).

Figures are built on ``matplotlib.figure.Figure`` (no pyplot state, no display
backend). Every axis says its unit, every figure with more than one series has
a legend, and goal lines are drawn where a stage issue states a goal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from astropy.stats import mad_std
from matplotlib.colors import AsinhNorm
from matplotlib.figure import Figure

from workflow_lib.core.bands import BAND_COLOURS, sorted_bands
from workflow_lib.core.flags import CcdVisitFlag

# The figures of a report page: wide enough for four panels side by side.
_PANEL = 3.6


def ccd_visit_figure(ccd_visits: pd.DataFrame) -> Figure:
    """Seeing, zero point, sky and astrometric rms of every CCD-visit against time, by band.

    Failed CCD-visits (no calibration) are drawn as crosses on the time axis of
    the seeing panel, so a gap in the data has its cause on the same page.
    """
    fig = Figure(figsize=(4 * _PANEL, _PANEL), layout="constrained")
    axes = fig.subplots(1, 4, sharex=True)
    failed = (ccd_visits["flags"].to_numpy() & int(CcdVisitFlag.FAILED)) != 0
    ok = ccd_visits[~failed]
    panels = [
        ("seeing", 1.0, "PSF FWHM (arcsec)"),
        ("zeroPoint", 1.0, "zero point (AB mag for 1 e-/s)"),
        ("skyBg", 1.0, "sky (CcdVisit.skyBg)"),
        ("astromRms", 1000.0, "astrometric fit rms (mas)"),
    ]
    for ax, (column, scale, label) in zip(axes, panels, strict=True):
        for band in sorted_bands(ok["band"]):
            rows = ok[ok["band"] == band]
            ax.plot(
                rows["midpointMjdTai"],
                rows[column] * scale,
                "o",
                ms=3,
                color=BAND_COLOURS.get(band),
                label=band,
            )
        ax.set_ylabel(label)
        ax.set_xlabel("MJD (TAI)")
        ax.grid(alpha=0.3)
    if failed.any():
        bad = ccd_visits[failed]
        axes[0].plot(
            bad["midpointMjdTai"],
            np.full(len(bad), np.nanmin(ok["seeing"]) if len(ok) else 0.0),
            "kx",
            label=f"failed ({len(bad)})",
        )
    axes[0].legend(fontsize="small", title="band")
    fig.suptitle(f"{len(ok)} calibrated CCD-visits, {int(failed.sum())} failed")
    return fig


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks (the edge remainder dropped)."""
    if factor <= 1:
        return image
    ny, nx = (s // factor for s in image.shape)
    blocks = image[: ny * factor, : nx * factor].reshape(ny, factor, nx, factor)
    return np.nanmean(blocks, axis=(1, 3))


def _data_box(no_data: Sequence[np.ndarray]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Row and column ranges holding data in any of the masks (the whole image if none)."""
    has_data = ~np.logical_and.reduce([np.asarray(m, bool) for m in no_data])
    rows, cols = np.flatnonzero(has_data.any(axis=1)), np.flatnonzero(has_data.any(axis=0))
    if not rows.size:
        return (0, has_data.shape[0]), (0, has_data.shape[1])
    return (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)


def lupton_rgb(
    images: Mapping[str, np.ndarray], noise: Mapping[str, float], *, q: float = 8.0
) -> np.ndarray:
    """A colour picture of up to three bands (reddest as red), Lupton et al. (2004) asinh.

    Each band is divided by its noise so that the stretch is in S/N units; a
    missing colour channel is the mean of the others.
    """
    from astropy.visualization import make_lupton_rgb

    bands = sorted_bands(images)[-3:]
    scaled = [np.nan_to_num(images[b] / noise[b]) for b in bands]
    while len(scaled) < 3:
        scaled.insert(len(scaled) // 2, np.mean(scaled, axis=0))
    blue, green, red = scaled
    return make_lupton_rgb(red, green, blue, minimum=-1.0, stretch=40.0, Q=q)


def color_image_figure(
    panels: Sequence[tuple[str, Mapping[str, Any], pd.DataFrame | None]],
    *,
    max_pixels: int = 800,
) -> Figure:
    """Side-by-side colour pictures of coadds: ``(title, {band: Exposure}, objects)``.

    Coadds are block-averaged to at most ``max_pixels`` on a side; the given
    Objects (ra, dec) are circled.
    """
    fig = Figure(figsize=(2 * _PANEL * len(panels), 2 * _PANEL + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    # One box for every panel, so the pictures compare pixel for pixel.
    masks = [c.mask_of("NO_DATA") for _, coadds, _ in panels for c in coadds.values()]
    (y0, y1), (x0, x1) = _data_box(masks) if masks else ((0, 1), (0, 1))
    for ax, (title, coadds, objects) in zip(axes, panels, strict=True):
        if not coadds:
            ax.text(0.5, 0.5, "no coadd", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title)
            ax.set_axis_off()
            continue
        first = next(iter(coadds.values()))
        factor = max(1, int(np.ceil(max(y1 - y0, x1 - x0) / max_pixels)))
        images, noise = {}, {}
        for band, coadd in coadds.items():
            image = np.where(coadd.mask_of("NO_DATA"), np.nan, coadd.image)[y0:y1, x0:x1]
            images[band] = _block_mean(image, factor)
            sigma = np.sqrt(np.nanmedian(np.where(coadd.variance > 0, coadd.variance, np.nan)))
            noise[band] = float(sigma) / factor if np.isfinite(sigma) else 1.0
        ax.imshow(lupton_rgb(images, noise), origin="lower", interpolation="nearest")
        if objects is not None and len(objects):
            x, y = first.wcs.all_world2pix(objects["ra"], objects["dec"], 0)
            ax.plot(
                (x - x0 + 0.5) / factor - 0.5,
                (y - y0 + 0.5) / factor - 0.5,
                "o",
                mfc="none",
                mec="cyan",
                ms=5,
                mew=0.6,
                label=f"{len(objects)} primary Objects, S/N > 10",
            )
            ax.legend(loc="upper right", fontsize="small")
        ax.set_xlim(-0.5, images[sorted_bands(images)[0]].shape[1] - 0.5)
        ax.set_ylim(-0.5, images[sorted_bands(images)[0]].shape[0] - 0.5)
        ax.set_title(f"{title} ({', '.join(sorted_bands(coadds))}; 1 px = {factor} coadd px)")
        ax.set_xlabel(f"x - {x0} (binned px)")
        ax.set_ylabel(f"y - {y0} (binned px)")
    return fig


def cutout_figure(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, bool]],
) -> Figure:
    """Triplets (science, template, difference) of DIASource stamps, one row each.

    Each row: ``(label, science, template, difference, is_dipole)``; science and
    template share one grey scale, the difference a symmetric one. Dipoles are
    framed in orange.
    """
    n = max(len(rows), 1)
    fig = Figure(figsize=(3 * 1.9 + 0.8, 1.9 * n + 0.5), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n, 3, squeeze=False))
    for k, col in enumerate(("science", "template", "difference")):
        axes[0, k].set_title(col)
    for (label, science, template, difference, dipole), row in zip(rows, axes, strict=False):
        both = np.concatenate([science[np.isfinite(science)], template[np.isfinite(template)]])
        # asinh: linear within the noise, logarithmic up to the star's peak
        sky = float(np.median(both)) if both.size else 0.0
        noise = float(mad_std(both)) if both.size else 1.0
        peak = float(np.max(both)) if both.size else 1.0
        norm = AsinhNorm(
            linear_width=max(noise, 1e-6), vmin=sky - 2 * noise, vmax=max(peak, sky + noise)
        )
        lim = np.nanpercentile(np.abs(difference), 99.5) if np.isfinite(difference).any() else 1
        row[0].imshow(science, origin="lower", cmap="gray", norm=norm)
        row[1].imshow(template, origin="lower", cmap="gray", norm=norm)
        row[2].imshow(difference, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            if dipole:
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:orange")
                    spine.set_linewidth(2.5)
        row[0].set_ylabel(label + ("\ndipole" if dipole else ""), fontsize="small")
    if not rows:
        for ax in axes[0]:
            ax.set_axis_off()
        axes[0, 1].text(0.5, 0.5, "no DIASource", ha="center", va="center")
    return fig


def _goal_band(ax: Any, lo: float, hi: float, *, label: str, axis: str = "y") -> None:
    span = ax.axhspan if axis == "y" else ax.axvspan
    span(lo, hi, color="tab:green", alpha=0.15, label=label)


def _pull_histograms(ax: Any, groups: Mapping[str, Mapping[str, Any]]) -> None:
    """Pull histograms (``metrics`` ``histogram`` entries) as densities, with N(0, 1)."""
    colours = iter(["tab:gray", "tab:purple", "tab:blue"])
    for label, group in groups.items():
        hist = group.get("histogram")
        colour = next(colours)
        if not hist or not group.get("n"):
            continue
        edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"], float)
        total = counts.sum() + hist["n_below"] + hist["n_above"]
        density = counts / max(total, 1) / np.diff(edges)
        sigma = group.get("robust_sigma", group.get("sigma"))
        ax.stairs(
            density,
            edges,
            color=colour,
            lw=1.5,
            label=f"{label}: n={group['n']}, σ={sigma:.2f}" if sigma is not None else label,
        )
    grid = np.linspace(-5, 5, 201)
    ax.plot(grid, np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi), "g--", lw=1, label="N(0, 1)")
    ax.set_ylabel("density")
    ax.legend(fontsize="x-small")


def _dia_truth_panels(ax_e: Any, ax_q: Any, dia: Mapping[str, Any]) -> None:
    """DIA efficiency against true S/N, and false positives per CCD-visit."""
    bins = pd.DataFrame(dia.get("efficiency", {}).get("bins", []))
    if len(bins) and bins["n"].sum():
        centre = _draw_efficiency_bins(ax_e, bins, color="tab:blue", label='found (1")')
        ax_e.axvline(5.0, color="tab:green", ls=":", label="detection threshold 5σ")
        ax_e.set_xscale("log")
        ax_e.set_xlim(1.0, 1.5 * float(np.max(centre)))
        ax_e.set_ylim(-0.05, 1.05)
        ax_e.set_xlabel("|true difference| / noise")
        ax_e.set_ylabel("DIA detection efficiency")
        ax_e.set_title(f"{int(bins['n'].sum())} true flux changes", fontsize="medium")
        ax_e.legend(fontsize="small")
    else:
        ax_e.set_axis_off()
    fp = dia.get("false_positives", {})
    counts = np.asarray(fp.get("per_ccd_visit", []), dtype=float)
    if counts.size:
        ax_q.hist(counts, bins=min(20, max(5, counts.size // 2)), color="tab:red")
        ax_q.axvline(np.median(counts), color="k", ls="--", label=f"median {np.median(counts):.0f}")
        ax_q.set_xlabel("false DIASources per CCD-visit")
        ax_q.set_ylabel("CCD-visits")
        share = fp.get("n_at_static_objects", 0) / max(fp.get("n_total", 1), 1)
        ax_q.set_title(f"false positives ({share:.0%} at static objects)", fontsize="medium")
        ax_q.legend(fontsize="small")
    else:
        ax_q.set_axis_off()


def truth_figure(metrics: Mapping[str, Any], matched_stars: pd.DataFrame | None) -> Figure:
    """The figures against a simulation's truth, each with its goal.

    From ``metrics["truth"]``: point-source completeness per band (binned, the
    fitted logistic, and the predicted 5-sigma depth with the +-0.3 mag goal),
    forced-photometry pull widths per S/N bin (goal 0.9-1.1) and the DIA
    light-curve pull widths. From ``matched_stars`` (bright Sources matched to
    truth stars): astrometric offsets and PSF-magnitude residuals.
    """
    truth = metrics.get("truth", {})
    static = truth.get("static_sky", {})
    fig = Figure(figsize=(4 * _PANEL + 1, 3 * _PANEL), layout="constrained")
    panels = fig.subplot_mosaic("CAPF;HLEQ;TTTT", height_ratios=[1, 1, 0.55])
    ax_c, ax_a, ax_p, ax_f = (panels[k] for k in "CAPF")
    ax_h, ax_l, ax_e, ax_q, ax_t = (panels[k] for k in "HLEQT")
    _dia_truth_panels(ax_e, ax_q, truth.get("difference_imaging", {}))
    for band, c in static.get("completeness", {}).items():
        colour = BAND_COLOURS.get(band)
        bins = pd.DataFrame(c.get("bins", []))
        if len(bins):
            ax_c.plot(bins["mag"], bins["completeness"], "o", ms=3, color=colour, label=band)
        m50, width, c_max = (c.get(k) for k in ("m50", "width", "c_max"))
        if m50 is not None and width is not None and len(bins):
            mags = np.linspace(bins["mag"].min(), bins["mag"].max(), 200)
            ax_c.plot(mags, c_max / (1 + np.exp((mags - m50) / width)), "-", color=colour)
        if c.get("depth_mag") is not None:
            ax_c.axvline(c["depth_mag"], color=colour, ls=":", lw=1)
    purity_bins = pd.DataFrame(static.get("purity", {}).get("bins", []))
    if len(purity_bins):
        ax_c.plot(
            purity_bins["mag"],
            purity_bins["purity"],
            "ks-",
            ms=3,
            lw=0.8,
            label="purity (Objects, S/N>10;\nmeasured ref-band mag)",
        )
        ax_c.axhline(0.99, color="k", ls=":", lw=0.8)
    ax_c.set_xlabel("magnitude (AB)")
    ax_c.set_ylabel("completeness (stars) / purity")
    ax_c.set_title(
        "completeness, purity (dotted: 5σ depth;\ngoal: 50% within 0.3 mag; 0.99)",
        fontsize="medium",
    )
    ax_c.legend(fontsize="small")

    if matched_stars is not None and len(matched_stars):
        cos_dec = np.cos(np.deg2rad(matched_stars["truth_dec"]))
        d_ra = (matched_stars["ra"] - matched_stars["truth_ra"]) * cos_dec * 3.6e6
        d_dec = (matched_stars["dec"] - matched_stars["truth_dec"]) * 3.6e6
        lim = float(np.nanpercentile(np.hypot(d_ra, d_dec), 99)) or 1.0
        ax_a.hexbin(d_ra, d_dec, gridsize=30, extent=(-lim, lim, -lim, lim), mincnt=1, cmap="Blues")
        rms = float(np.sqrt(np.mean(d_ra**2 + d_dec**2)))
        ax_a.set_title(
            f"positions - truth, {len(matched_stars)}\nbright stars: rms {rms:.1f} mas",
            fontsize="medium",
        )
        ax_a.set_xlabel("ΔRA cos Dec (mas)")
        ax_a.set_ylabel("ΔDec (mas)")
        mag_true = 31.4 - 2.5 * np.log10(matched_stars["truth_flux"])
        resid = -2500 * np.log10(matched_stars["psfFlux"] / matched_stars["truth_flux"])
        for band in sorted_bands(matched_stars["band"]):
            sel = (matched_stars["band"] == band).to_numpy()
            ax_p.plot(
                mag_true[sel], resid[sel], ".", ms=2, color=BAND_COLOURS.get(band), label=band
            )
        _goal_band(ax_p, -5, 5, label="±5 mmag")
        ax_p.set_ylim(-60, 60)
        ax_p.set_xlabel("true magnitude (AB)")
        ax_p.set_ylabel("PSF mag - true (mmag)")
        ax_p.set_title("single-frame PSF photometry\nof bright stars", fontsize="medium")
        ax_p.legend(fontsize="small", markerscale=4)
    else:
        for ax in (ax_a, ax_p):
            ax.set_axis_off()

    forced = static.get("forced_pulls", {})
    by_snr = forced.get("by_snr", {})
    if by_snr:
        labels = list(by_snr)
        sigmas = [by_snr[k].get("sigma") for k in labels]
        ax_f.bar(range(len(labels)), [np.nan if s is None else s for s in sigmas], color="tab:blue")
        ax_f.set_xticks(range(len(labels)), [k.replace("1e+09", "∞") for k in labels], rotation=30)
        _goal_band(ax_f, 0.9, 1.1, label="goal 0.9-1.1")
        ax_f.set_xlabel("true S/N")
        ax_f.set_ylabel("robust σ of forced pulls")
        ax_f.set_title(
            f"forced photometry of stars:\nσ {forced.get('sigma', np.nan):.2f} at S/N < 20",
            fontsize="medium",
        )
        ax_f.legend(fontsize="small")
    else:
        ax_f.set_axis_off()

    lc = truth.get("light_curves", {})
    dia_groups = {
        "noise (no true change)": lc.get("noise", {}),
        "transients": lc.get("transient", {}),
    }
    if any(g.get("n") for g in dia_groups.values()):
        _pull_histograms(ax_l, dia_groups)
        ax_l.set_xlabel("(psfDiffFlux - true) / psfDiffFluxErr")
        ax_l.set_title("DIA light-curve pulls (goal σ 0.95-1.05)", fontsize="medium")
    else:
        ax_l.set_axis_off()
    if forced.get("histogram"):
        _pull_histograms(ax_h, {"stars, true S/N < 20": forced})
        ax_h.set_xlabel("(psfFlux - true) / psfFluxErr")
        ax_h.set_title("forced photometry pulls (goal σ 0.9-1.1)", fontsize="medium")
    else:
        ax_h.set_axis_off()

    rows = []
    purity = static.get("purity", {})
    if purity:
        rows.append(("Object purity, S/N>10", purity.get("purity"), "≥ 0.99"))
    for band, bias in static.get("bright_star_bias", {}).items():
        rows.append((f"star bias {band} (mmag)", bias.get("median_mmag"), "|x| ≤ 5"))
    association = truth.get("association", {})
    if association:
        rows.append(
            (
                "transients: 1 DIAObject",
                association.get("transient", {}).get("fraction_in_one_object"),
                "1",
            )
        )
        rows.append(
            (
                "merged truths",
                association.get("n_merging_true_objects_2arcsec_apart"),
                "0",
            )
        )
    ax_t.set_axis_off()
    if rows:
        table = ax_t.table(
            cellText=[[n, "—" if v is None else f"{v:.3g}", g] for n, v, g in rows],
            colLabels=["figure", "value", "goal"],
            loc="upper left",
            colLoc="left",
            cellLoc="left",
            colWidths=[0.5, 0.25, 0.25],
            # matplotlib documents bbox as a Bbox or [xmin, ymin, width, height]; its
            # stub allows only a Bbox.
            bbox=(0.0, 0.0, 1.0, 1.0),  # type: ignore[arg-type]
        )
        table.auto_set_font_size(False)
        table.set_fontsize(8)
    return fig


def _draw_efficiency_bins(ax: Any, bins: pd.DataFrame, **style: Any) -> np.ndarray:
    """Found fraction per S/N bin (``efficiency_bins`` rows) with binomial errors, at the
    bins' geometric centres (the open last bin at 1.5x its lower edge); returns those."""
    bins = bins[bins["n"] > 0]
    snr_max = bins["snr_max"].astype(float).fillna(np.inf)
    upper = np.where(np.isfinite(snr_max), snr_max, 2.25 * bins["snr_min"])
    centre = np.sqrt(np.maximum(bins["snr_min"], 1.0) * upper)
    eff = bins["n_detected"] / bins["n"]
    err = np.sqrt(np.clip(eff * (1 - eff), 0.05, None) / bins["n"])
    ax.errorbar(centre, eff, yerr=err, fmt="o", ms=4, capsize=2, **style)
    return np.asarray(centre)


def injection_figure(injections: pd.DataFrame, summary: Mapping[str, Any]) -> Figure:
    """What source injection measured (no truth needed): the DIASource search's efficiency
    against the injected sources' S/N, on blank sky and on calexp sources, with the fitted
    logistic and the goals (50 % at S/N <= 5, 95 % at S/N >= 6.5); the forced difference
    flux against the injected flux (goal: bias < 1 % at S/N > 20); the offsets of the
    DIASources found at S/N > 20 (goal: 0.03" rms per axis)."""
    from workflow_lib.qa.efficiency import efficiency_bins
    from workflow_lib.qa.survey_metrics import (
        INJECTION_BRIGHT_SNR,
        INJECTION_HIGH_SNR,
        INJECTION_SNR_EDGES,
    )

    fig = Figure(figsize=(3 * _PANEL + 1.5, _PANEL + 0.4), layout="constrained")
    ax_e, ax_f, ax_p = fig.subplots(1, 3)
    snr = injections["snr"].to_numpy(dtype=np.float64)
    clean = injections["clean"].to_numpy(dtype=bool)
    hosted = injections["hostFlux"].to_numpy(dtype=np.float64) > 0
    for sel, colour, label in (
        (~hosted, "tab:blue", "blank sky"),
        (hosted, "tab:orange", "on a source"),
    ):
        bins = pd.DataFrame(efficiency_bins(snr[sel], clean[sel], INJECTION_SNR_EDGES))
        _draw_efficiency_bins(ax_e, bins, color=colour, label=label)
    fit = summary.get("fit", {})
    if np.isfinite(fit.get("snr_50", np.nan)):
        grid = np.geomspace(1.0, 100.0, 300)
        curve = fit["plateau"] / (1.0 + np.exp(-(grid - fit["snr_50"]) / fit["width"]))
        ax_e.plot(grid, curve, "k-", lw=1, label=f"fit: 50 % at S/N {fit['snr_50']:.2f}")
    ax_e.plot([5.0], [0.5], marker="x", color="tab:green", ms=9, ls="none", label="goal: 50 % by 5")
    ax_e.fill_between(
        [INJECTION_HIGH_SNR, 100.0],
        0.95,
        1.0,
        color="tab:green",
        alpha=0.15,
        label=f"goal: ≥ 95 % from {INJECTION_HIGH_SNR}",
    )
    ax_e.set_xscale("log")
    ax_e.set_xlim(1.0, 100.0)
    ax_e.set_ylim(-0.05, 1.05)
    ax_e.set_xlabel("injected flux / difference-image error (S/N)")
    ax_e.set_ylabel("fraction found as a clean DIASource")
    ax_e.set_title(
        f"{len(injections)} injected sources, {summary.get('n_ccd_visits', 0)} CCD-visits",
        fontsize="medium",
    )
    ax_e.legend(fontsize="x-small", loc="lower right")

    flux = injections["injectedFlux"].to_numpy(dtype=np.float64)
    ratio = injections["diffFlux"].to_numpy(dtype=np.float64) / flux - 1.0
    ok = np.isfinite(ratio) & (snr > 0)
    ax_f.plot(snr[ok], 100 * ratio[ok], ".", ms=3, color="tab:gray", label="each source")
    grid = np.geomspace(1.0, 100.0, 100)
    ax_f.plot(grid, 100 / grid, "k:", lw=0.8, label="±1σ of the noise")
    ax_f.plot(grid, -100 / grid, "k:", lw=0.8)
    bias = summary.get("forced_flux_bias_snr_gt_20", np.nan)
    ax_f.fill_between(
        [INJECTION_BRIGHT_SNR, 100.0],
        -1.0,
        1.0,
        color="tab:green",
        alpha=0.3,
        label="goal: |bias| < 1 % above S/N 20",
    )
    if np.isfinite(bias):
        ax_f.plot(
            [INJECTION_BRIGHT_SNR, 100.0],
            [100 * bias] * 2,
            color="tab:red",
            lw=1.5,
            label=f"median above 20: {100 * bias:+.2f} %",
        )
    ax_f.set_xscale("log")
    ax_f.set_xlim(1.0, 100.0)
    ax_f.set_ylim(-15, 15)
    ax_f.set_xlabel("injected S/N")
    ax_f.set_ylabel("forced difference flux / injected - 1 (%)")
    ax_f.set_title("flux of the injected sources", fontsize="medium")
    ax_f.legend(fontsize="x-small", loc="upper right")

    bright = injections[clean & (snr > INJECTION_BRIGHT_SNR)]
    d_ra = 1000 * bright["raOffset"].to_numpy(dtype=np.float64)
    d_dec = 1000 * bright["decOffset"].to_numpy(dtype=np.float64)
    sig_ra, sig_dec = (
        1000 * s for s in summary.get("position_sigma_arcsec_snr_gt_20", [np.nan] * 2)
    )
    ax_p.plot(d_ra, d_dec, ".", ms=4, color="tab:blue", label=f"{len(bright)} found, S/N > 20")
    theta = np.linspace(0, 2 * np.pi, 200)
    ax_p.plot(
        30 * np.cos(theta),
        30 * np.sin(theta),
        color="tab:green",
        lw=1,
        label="goal: σ ≤ 30 mas per axis",
    )
    lim = max(90.0, float(np.nanpercentile(np.hypot(d_ra, d_dec), 98)) if len(bright) else 90.0)
    ax_p.set_xlim(-lim, lim)
    ax_p.set_ylim(-lim, lim)
    ax_p.set_aspect("equal")
    ax_p.set_xlabel("ΔRA cos Dec (mas)")
    ax_p.set_ylabel("ΔDec (mas)")
    ax_p.set_title(
        f"DIASource - injected position:\nσ {sig_ra:.0f}, {sig_dec:.0f} mas", fontsize="medium"
    )
    ax_p.legend(fontsize="x-small", loc="upper right")
    return fig
