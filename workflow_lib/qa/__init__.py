"""Quality figures: the pipeline's products against a simulation's truth, and from data alone.

LSST's ``faro`` / ``validate_drp`` metrics (PA1, AM1) and the truth matching of
DESC's DC2 validation.
"""
