"""The static sky: sky maps, warps and coadds.

LSST's ``makeSkyMap``, ``makeCoaddTempExp`` (``warp``: calexps resampled onto a
patch, direct and PSF-matched, with ``psf_matching`` the matching kernels) and
``assembleCoadd`` / ``CompareWarpAssembleCoadd`` (``coadd``, ``coadd_inputs``,
``compare_warp``), each coadd carrying its PSF (``coadd_psf``: ``CoaddPsf``).
Deep and template coadds are both built here.
"""
