"""Throughput of each stage against a plain loop of the same work: training steps, encode, encode with
captions, sampling."""
