"""longcot.bench: kernel microbenchmarks and end-to-end benchmarks (tables + JSON)."""
