"""distillbench.benchmark — protocols, model zoo, teacher store, runner, run records and the CLI."""
