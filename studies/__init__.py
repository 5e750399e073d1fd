"""Studies: one-off comparisons and the GPU device script. Run from a checkout
(`python -m studies.front_compare ...`); not part of the installed package."""
