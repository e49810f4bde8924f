"""The names under which methods report their own statistics (a router's use of its prompts, SMoP),
shared by the methods that write them (`eval_stats`) and the lab tools that read them back
(`ptlab-compare`'s tables and router figures), which never spell the names out. No torch here, so
`ptlab-compare` stays light."""

from __future__ import annotations

from typing import Dict, List, Optional

ROUTING_PREFIX = "router_"


def routing_stats(shares: List[float], entropy: float) -> Dict[str, float]:
    """The statistics a routing method reports for one evaluation."""
    stats = {f"{ROUTING_PREFIX}prompt{i}_fraction": share for i, share in enumerate(shares)}
    stats[f"{ROUTING_PREFIX}entropy"] = entropy
    return stats


def routing_shares(event: Dict[str, float]) -> Optional[List[float]]:
    """The per-prompt shares in a logged evaluation, or None when its method did not route."""
    shares = []
    while f"{ROUTING_PREFIX}prompt{len(shares)}_fraction" in event:
        shares.append(event[f"{ROUTING_PREFIX}prompt{len(shares)}_fraction"])
    return shares or None


def is_method_statistic(key: str) -> bool:
    """Whether a logged metric is a method's own statistic rather than a task metric."""
    return key.startswith(ROUTING_PREFIX)
