"""The benchmarks' baseline: FedAvg rounds run one site after another in one process, no Ray, no tracking."""

from __future__ import annotations

import time
from typing import Any

from fl_ray.fedavg import StreamingAverage


def sequential_rounds(clients: list[tuple[Any, Any]], server: Any, server_ctx: Any, num_rounds: int) -> list[float]:
    """Run ``num_rounds`` rounds: each ``(learner, ctx)`` of ``clients`` trains on the global weights in turn,
    the weighted average becomes the new global model and ``server`` evaluates it. Returns each round's seconds."""
    weights, times = server.get_weights(), []
    for r in range(1, num_rounds + 1):
        start = time.perf_counter()
        avg = StreamingAverage()
        for learner, ctx in clients:
            ctx.round = r
            result = learner.train(weights, ctx)
            avg.add(result.weights, result.num_samples)
        weights = avg.result()
        server.evaluate(weights, server_ctx)
        times.append(time.perf_counter() - start)
    return times
