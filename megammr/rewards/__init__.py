"""Rule-based rewards: strict format + answer accuracy (math-verify, multiple choice).

    from megammr.rewards import RewardPool, RewardItem
    with RewardPool(recipe.reward) as pool:
        results = pool.score([RewardItem(response, answer, choices), ...])
    # each result: .format, .accuracy (0/1), .reward (weighted), .status (ok|timeout|crash|error)

Model output is hostile text: it is only ever parsed in worker processes under a hard time
limit, and no parsing path evaluates it as Python (see safe_parse.py).
"""
from megammr.rewards.core import RewardItem, RewardResult, Weights, score_item
from megammr.rewards.pool import PoolStats, RewardPool, latency_percentile

__all__ = ["RewardItem", "RewardResult", "Weights", "score_item", "RewardPool", "PoolStats", "latency_percentile"]
