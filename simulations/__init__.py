"""Experiments, benchmarks and the fedembed command line that drives them."""
