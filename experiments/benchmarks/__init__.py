"""Speed benchmarks: scripts that print figures as JSON lines (never tests; figures vary by machine).

Run each as a module from the repository root, e.g. ``python -m experiments.benchmarks.throughput``, or all of them
with ``make bench``. ``workloads`` holds the models and inputs they time; ``timing`` the interleaved-rounds method;
``reporting`` the JSON lines and the hardware they name.
"""
