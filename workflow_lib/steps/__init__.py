"""Steps: read inputs, call numerics, write products."""
