"""The benchmark (bench/run); not part of the product or of the test suite."""
