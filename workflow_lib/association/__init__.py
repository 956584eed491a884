"""Association: DIASources into DIAObjects per patch, their forced photometry, light curves.

dia_pipe's ``associationDriver`` and ``forcedPhotCcdDiaDriver``: DIASources
of a patch's inner region joined into DIAObjects, the DIAObjects measured on
every difference image and calexp they fall on (``DiaForcedSource``).
"""
