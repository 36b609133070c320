"""The study commands over runs: sweep, compare, hvp-error, bench and the curvature time series."""
