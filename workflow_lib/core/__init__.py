"""The shared layer: the data model and machinery every stage uses.

``exposure`` (an image with mask, variance, WCS, PSF and calibration: LSST's
``afw.image.Exposure``), ``psf_model`` (the POLYPIX PSF every stage evaluates),
``flags`` (the bit masks of the CONTRACT's tables), ``registry`` (the raw files
and their data ids: LSST's butler registry and ``ingestRaws``), ``config`` (the
validated configuration), ``paths`` (where every dataset lives) and ``timing``.
Nothing here imports a stage, ``io``, ``steps`` or the workflow layer.
"""
