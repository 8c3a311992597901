"""Capacity simulator: GPUs needed by fixed expert-parallel groups vs fine-grained EaaS.

The model and its assumptions are stated in :mod:`eaas.sim.model`.
"""

from __future__ import annotations

from eaas.sim.capacity import CapacityPoint, CapacitySimulator
from eaas.sim.model import ServerModel, expert_shares, zipf_trace
from eaas.sim.placement import EaasPlacement, eaas_max_share, eaas_placement, ep_max_share

__all__ = [
    "ServerModel", "zipf_trace", "expert_shares", "CapacitySimulator", "CapacityPoint",
    "EaasPlacement", "eaas_placement", "eaas_max_share", "ep_max_share",
]
