"""Tools nothing in the package imports: benchmark, grid (ablations, seeds), probe, device_check."""
