"""Step schedules of the pruning run."""


def linear_ramp(step: int, start: int, length: int) -> float:
    """0 before ``start``, then (step - start + 1) / length until it reaches 1 (docs/method.md §3.1); 1 from
    ``start`` on when ``length`` is 0."""
    if step < start:
        return 0.0
    if length == 0:
        return 1.0
    return min((step - start + 1) / length, 1.0)
