"""distillbench.leaderboards — run records → published tables."""
