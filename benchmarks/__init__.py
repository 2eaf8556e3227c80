"""Benchmarks of masked-diffusion: training speed, sampling speed and quality."""
