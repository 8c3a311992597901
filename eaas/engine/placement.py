"""Expert placement: which server hosts which experts, and the routing table built from it.

Worked example (round_robin, E=4 experts, N=3 servers, 2 replicas; the same for every MoE layer):

    expert 0 -> servers [0, 1]      expert 2 -> servers [2, 0]
    expert 1 -> servers [1, 2]      expert 3 -> servers [0, 1]
    server 0 hosts {0, 2, 3}, server 1 hosts {0, 1, 3}, server 2 hosts {1, 2}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from eaas.config import PlacementConfig
from eaas.errors import ConfigError


def server_name(index: int) -> str:
    return f"expert-{index}"


def expert_homes(cfg: PlacementConfig, num_experts: int) -> dict[int, list[int]]:
    """expert id -> server indices hosting it, first copy first."""
    n, r = cfg.num_expert_servers, cfg.expert_replicas
    homes: dict[int, list[int]] = {e: [] for e in range(num_experts)}
    if cfg.strategy == "explicit":
        assert cfg.explicit_map is not None
        for s, ids in sorted(cfg.explicit_map.items()):
            for e in ids:
                if e >= num_experts:
                    raise ConfigError(f"placement.explicit_map[{s}] names expert {e}, but the "
                                      f"model has {num_experts} experts (ids 0..{num_experts - 1})")
                if s not in homes[e]:
                    homes[e].append(s)
        missing = [e for e, h in homes.items() if not h]
        if missing:
            raise ConfigError(f"placement.explicit_map hosts no copy of experts {missing[:8]}; "
                              "every expert needs at least one server")
        return homes
    for e in range(num_experts):
        first = e % n if cfg.strategy == "round_robin" else e * n // num_experts
        homes[e] = [(first + i) % n for i in range(r)]
    return homes


@dataclass(frozen=True, slots=True)
class RoutingSnapshot:
    """An immutable routing table: (layer, expert) -> live server names, stamped with a generation.

    Shards hold the snapshot they dispatched with; work units carry its generation so results
    computed under an older table can be recognised.
    """

    generation: int
    table: Mapping[int, Mapping[int, tuple[str, ...]]]  # layer -> expert -> server names
    dead: frozenset[str] = field(default_factory=frozenset)

    def servers_for(self, layer: int, expert: int) -> tuple[str, ...]:
        return self.table[layer][expert]

    def hosted_by(self, server: str) -> dict[int, list[int]]:
        """layer -> sorted expert ids that `server` hosts in this table."""
        out: dict[int, list[int]] = {}
        for layer, experts in self.table.items():
            ids = [e for e, names in experts.items() if server in names]
            if ids:
                out[layer] = sorted(ids)
        return out

    def to_dict(self) -> dict:
        return {"generation": self.generation, "dead": sorted(self.dead),
                "table": {str(l): {str(e): list(s) for e, s in ex.items()}
                          for l, ex in self.table.items()}}


def initial_routing(cfg: PlacementConfig, moe_layers: Iterable[int], num_experts: int
                    ) -> RoutingSnapshot:
    homes = expert_homes(cfg, num_experts)
    row = {e: tuple(server_name(s) for s in servers) for e, servers in homes.items()}
    return RoutingSnapshot(generation=1, table={layer: dict(row) for layer in moe_layers})
