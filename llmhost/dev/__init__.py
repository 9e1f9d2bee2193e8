"""For developers: the benchmark (bench) and the tiny random-weight models
built offline for tests and benchmarks (tinymodels)."""
