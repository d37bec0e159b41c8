"""Graph passes: cleanup before analysis, residual alignment of a plan, QDQ insertion."""
