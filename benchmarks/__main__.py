"""Run the benchmarks: ``python -m benchmarks --output benchmarks/results``."""

from benchmarks.run import main

main()
