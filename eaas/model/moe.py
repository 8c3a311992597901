"""The MoE pieces: routers, the routed ExpertBank, the dense/shared MLP, and combine_experts.

combine_experts is the ONE place routed outputs are weighted and summed; the monolithic reference
and the disaggregated engine both call it, so their results are bitwise equal when every row is
computed batch-invariantly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from eaas.model import ops
from eaas.model.checkpoint import Checkpoint
from eaas.model.config import ModelConfig

__all__ = ["MLP", "ExpertBank", "Router", "combine_experts"]


def combine_experts(expert_out: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of routed expert outputs.

    expert_out: [T, K, H] (row t, slot k = output of expert topk_ids[t, k] on token t);
    topk_weights: [T, K] float32. Returns [T, H] in expert_out's dtype. Accumulates in float32
    in the fixed order k = 0..K-1, so the result depends only on (expert_out, topk_weights).
    """
    if expert_out.dim() != 3 or topk_weights.shape != expert_out.shape[:2]:
        raise ValueError(
            f"combine_experts: expert_out {tuple(expert_out.shape)} and topk_weights "
            f"{tuple(topk_weights.shape)} must be [T, K, H] and [T, K]"
        )
    w = topk_weights.to(torch.float32)
    acc = expert_out[:, 0].to(torch.float32) * w[:, :1]  # [T, H]
    for k in range(1, expert_out.shape[1]):
        acc = acc + expert_out[:, k].to(torch.float32) * w[:, k : k + 1]
    return acc.to(expert_out.dtype)


class Router:
    """Top-k routing of one MoE layer.

    softmax (qwen, mixtral): probs = softmax(x W^T) in float32, top-k, optional renormalisation
    (mixtral always renormalises). sigmoid (deepseek_v3): scores = sigmoid(x W^T) in float32,
    choice by scores + e_score_correction_bias restricted to the best `topk_group` of `n_group`
    groups (group score = sum of its top-2), weights = scores of the chosen (renormalised if
    norm_topk_prob) times routed_scaling_factor.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        batch_invariant: bool = False,
    ) -> None:
        self.cfg, self.weight, self.bias, self.batch_invariant = cfg, weight, bias, batch_invariant

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (topk_ids int64 [T, K], topk_weights float32 [T, K])."""
        if x.is_cuda:  # Triton launches on the CURRENT device: make it x's (servers on cuda:N)
            with torch.cuda.device(x.device):
                return self._route_cuda(x)
        if self.batch_invariant:
            return ops.rowwise(self._route, x)
        return self._route(x)

    def _route_cuda(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Triton gating kernels (eaas_kernels); they treat every row alone, so only the
        logits need the batch-invariant linear."""
        import eaas_kernels

        cfg, k = self.cfg, self.cfg.num_experts_per_tok
        if cfg.scoring == "softmax":
            logits = ops.linear(x, self.weight, None, self.batch_invariant)  # [T, E]
            r = eaas_kernels.topk_softmax(logits, k, cfg.norm_topk_prob)
            return r.topk_ids, r.topk_weights
        logits = ops.linear(x.to(torch.float32), self.weight.to(torch.float32), None,
                            self.batch_invariant)  # [T, E]
        bias = None if self.bias is None else self.bias.to(torch.float32)
        r = eaas_kernels.topk_grouped_sigmoid(logits, bias, k, cfg.n_group, cfg.topk_group,
                                              cfg.routed_scaling_factor, cfg.norm_topk_prob)
        return r.topk_ids, r.topk_weights

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, k = self.cfg, self.cfg.num_experts_per_tok
        if cfg.scoring == "softmax":
            logits = ops.linear(x, self.weight, None, self.batch_invariant)  # [T, E]
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            topk_weights, topk_ids = torch.topk(probs, k, dim=-1)
            if cfg.norm_topk_prob:
                topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
            return topk_ids, topk_weights
        logits = ops.linear(
            x.to(torch.float32), self.weight.to(torch.float32), None, self.batch_invariant
        )  # [T, E]
        scores = logits.sigmoid()
        choice = scores + self.bias.to(torch.float32) if self.bias is not None else scores
        t, e, g = x.shape[0], cfg.num_experts, cfg.n_group
        group_scores = choice.view(t, g, e // g).topk(min(2, e // g), dim=-1)[0].sum(-1)  # [T, G]
        group_idx = torch.topk(group_scores, cfg.topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask[:, :, None].expand(t, g, e // g).reshape(t, e).bool()
        choice = choice.masked_fill(~expert_mask, float("-inf"))
        topk_ids = torch.topk(choice, k, dim=-1)[1]
        topk_weights = scores.gather(1, topk_ids)
        if cfg.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids, topk_weights * cfg.routed_scaling_factor


class MLP:
    """SwiGLU MLP (dense layers, shared experts). `gate_weight` [1, H]: qwen2_moe's sigmoid gate."""

    def __init__(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        gate_weight: torch.Tensor | None = None,
        batch_invariant: bool = False,
    ) -> None:
        self.gate, self.up, self.down, self.gate_weight = gate, up, down, gate_weight
        self.batch_invariant = batch_invariant

    @classmethod
    def load(
        cls,
        ckpt: Checkpoint,
        prefix: str,
        dtype: torch.dtype,
        device: str | torch.device,
        gate_name: str | None = None,
        batch_invariant: bool = False,
    ) -> MLP:
        def r(n: str) -> torch.Tensor:
            return ckpt.read(n, dtype, device)

        return cls(
            r(f"{prefix}.gate_proj.weight"),
            r(f"{prefix}.up_proj.weight"),
            r(f"{prefix}.down_proj.weight"),
            r(gate_name) if gate_name else None,
            batch_invariant,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        return ops.rowwise(self._mlp, x) if self.batch_invariant else self._mlp(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        bi = self.batch_invariant
        h = ops.silu_mul(ops.linear(x, self.gate, None, bi), ops.linear(x, self.up, None, bi))
        out = ops.linear(h, self.down, None, bi)
        if self.gate_weight is not None:
            out = torch.sigmoid(ops.linear(x, self.gate_weight, None, bi)) * out
        return out


class ExpertBank:
    """The routed experts of ONE layer that one server hosts (a subset of the layer's experts)."""

    def __init__(
        self,
        layer_idx: int,
        expert_ids: tuple[int, ...],
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        batch_invariant: bool = False,
    ) -> None:
        self.layer_idx = layer_idx
        self.expert_ids = expert_ids
        self.gate, self.up, self.down = (
            gate,
            up,
            down,
        )  # [E_local, F, H], [E_local, F, H], [E_local, H, F]
        self.batch_invariant = batch_invariant
        self._local = {e: i for i, e in enumerate(expert_ids)}
        # On CUDA the bank runs the Triton expert kernel (eaas_kernels.expert_rows) over stacked
        # weights; global expert ids map to local slots through a lookup table (-1: not hosted).
        self._w13 = self._w2 = self._lut = None
        if gate.is_cuda:
            self._w13 = torch.cat([gate, up], dim=1).contiguous()  # [E_local, 2F, H]
            self._w2 = down.contiguous()  # [E_local, H, F]
            lut = torch.full((max(expert_ids) + 1,), -1, dtype=torch.long)
            lut[list(expert_ids)] = torch.arange(len(expert_ids))
            self._lut_host = lut  # checks and maps host expert ids without a device sync
            self._lut = lut.to(gate.device)
            self._kernel_cfg = None  # batch-invariant: one block config for every batch size
            self._fused_cfg = None

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_gate_up [E_rows, 2F, H], w_down [E_rows, H, F]) as the grouped GEMM takes them
        (`eaas_kernels.fused_moe`); row i is `self._local`'s row of an expert. On CUDA the
        bank's own stacked tensors (no copy); on CPU a concatenation (a copy)."""
        if self._w13 is not None:
            return self._w13, self._w2
        return torch.cat([self.gate, self.up], dim=1), self.down

    def rows(self) -> dict[int, int]:
        """The weight row of each hosted expert (its index here, or its global id in a view of
        a whole-layer bank)."""
        return dict(self._local)

    def view(self, expert_ids: Iterable[int]) -> ExpertBank:
        """A bank hosting only `expert_ids` over this whole-layer bank's weights (no copy): what
        an in-process server gets from the device's shared store."""
        ids = tuple(sorted({int(e) for e in expert_ids}))
        if not self._whole_layer():
            raise ValueError("ExpertBank.view needs a whole-layer bank (experts 0..E-1)")
        bad = [e for e in ids if not 0 <= e < self.gate.shape[0]]
        if not ids or bad:
            raise ValueError(f"layer {self.layer_idx}: cannot host experts {bad or '[]'} "
                             f"(the layer has {len(self.expert_ids)})")
        out = ExpertBank.__new__(ExpertBank)
        out.layer_idx, out.expert_ids = self.layer_idx, ids
        out.batch_invariant = self.batch_invariant
        out.gate, out.up, out.down = self.gate, self.up, self.down
        out._local = {e: e for e in ids}  # rows of the shared tensors are global expert ids
        out._w13, out._w2, out._lut = self._w13, self._w2, None
        if self._w13 is not None:
            lut = torch.full((len(self.expert_ids),), -1, dtype=torch.long)
            lut[list(ids)] = torch.tensor(ids)
            out._lut_host, out._lut = lut, lut.to(self.gate.device)
            out._kernel_cfg = out._fused_cfg = None
        return out

    @classmethod
    def load(
        cls,
        ckpt: Checkpoint,
        layer_idx: int,
        expert_ids: Iterable[int],
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        batch_invariant: bool = False,
    ) -> ExpertBank:
        """Read only experts `expert_ids` of layer `layer_idx` from `ckpt`."""
        ids = tuple(sorted({int(e) for e in expert_ids}))
        if not ids:
            raise ValueError("ExpertBank.load: expert_ids is empty")
        parts = [ckpt.read_expert(layer_idx, e, dtype, device) for e in ids]
        def stack(k: str) -> torch.Tensor:
            return torch.stack([p[k] for p in parts])

        return cls(layer_idx, ids, stack("gate"), stack("up"), stack("down"), batch_invariant)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Row n of x goes through expert expert_ids[n]: down(silu(gate x) * up x).

        x: [N, H]; expert_ids: int64 [N], every id hosted here (else ValueError naming it).
        Returns [N, H] in x's dtype.
        """
        if x.shape[0] != expert_ids.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but expert_ids has {expert_ids.shape[0]}")
        if self._w13 is not None and x.is_cuda:
            with torch.cuda.device(x.device):  # Triton launches on the current device
                return self._forward_cuda(x, expert_ids)
        out = x.new_empty(x.shape)
        present = torch.unique(expert_ids).tolist()
        missing = [e for e in present if e not in self._local]
        if missing:
            raise ValueError(
                f"layer {self.layer_idx}: experts {missing} are not hosted here "
                f"(hosted: {list(self.expert_ids)})"
            )
        for e in present:
            rows = (expert_ids == e).nonzero(as_tuple=True)[0]  # [n_e]
            i = self._local[e]

            def mlp(xe: torch.Tensor, i: int = i) -> torch.Tensor:  # [n, H] -> [n, H]
                h = ops.silu_mul(
                    torch.nn.functional.linear(xe, self.gate[i]),
                    torch.nn.functional.linear(xe, self.up[i]),
                )  # [n, F]
                return torch.nn.functional.linear(h, self.down[i])

            out[rows] = ops.rowwise(mlp, x[rows]) if self.batch_invariant else mlp(x[rows])
        return out

    def _forward_cuda(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The Triton path. A row's result depends only on its own data and the kernel's block
        config; batch_invariant pins one config for every batch size (no per-T tuning)."""
        from eaas_kernels.grouped_gemm import expert_rows_triton, moe_config_for

        assert self._lut is not None and self._w13 is not None and self._w2 is not None
        if expert_ids.numel() == 0:
            return x.new_empty(x.shape)
        if expert_ids.device.type == "cpu":
            # ids from a work unit live on the host: check and map them there, then copy the
            # local slots over without a sync (each sync would wait for all queued GPU work)
            ids = expert_ids.to(torch.long)
            lut = self._lut_host
            if int(ids.max()) >= lut.numel() or int(ids.min()) < 0 or bool((lut[ids] < 0).any()):
                self._not_hosted(ids)
            local = ops.upload(lut[ids], x.device)  # [N]
        else:
            ids = expert_ids.to(x.device)
            lut = self._lut
            safe = ids.clamp(0, lut.numel() - 1)  # [N]
            if bool(((ids != safe) | (lut[safe] < 0)).any()):  # the one sync of this path
                self._not_hosted(ids)
            local = lut[safe]
        cfg = None
        if self.batch_invariant:
            if self._kernel_cfg is None:
                self._kernel_cfg = moe_config_for(x, self._w13, 1, 1)
            cfg = self._kernel_cfg
        return expert_rows_triton(x, local, self._w13, self._w2, config=cfg)

    def routed(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
               ) -> torch.Tensor:
        """The layer's routed output with every expert in this bank: x [T, H], topk_ids int64
        [T, K], topk_weights float32 [T, K] -> [T, H] (weighted sum over k).

        On CUDA with the whole layer hosted: the fused Triton MoE kernel (no host sync, CUDA-graph
        capturable; one pinned block config when batch_invariant). Elsewhere: each (token, k) row
        through `forward`, then `combine_experts`.
        """
        t, k = topk_ids.shape
        if self._w13 is not None and x.is_cuda and self._whole_layer():
            from eaas_kernels.grouped_gemm import fused_moe_triton, moe_config_for

            with torch.cuda.device(x.device):
                cfg = None
                if self.batch_invariant:
                    if self._fused_cfg is None:
                        self._fused_cfg = moe_config_for(x, self._w13, 1, k)
                    cfg = self._fused_cfg
                return fused_moe_triton(x, self._w13, self._w2, topk_ids, topk_weights,
                                        config=cfg)
        rows = x.repeat_interleave(k, dim=0)  # [T*K, H]: row t*K + j is token t for slot j
        expert_out = self.forward(rows, topk_ids.reshape(-1)).view(t, k, -1)  # [T, K, H]
        return combine_experts(expert_out, topk_weights)

    def _whole_layer(self) -> bool:
        """Hosts every row of its weight tensors, expert e at row e (global id = local slot)."""
        return self.expert_ids == tuple(range(self.gate.shape[0]))

    def _not_hosted(self, ids: torch.Tensor) -> None:
        bad = sorted({e for e in ids.tolist() if e not in self._local})
        raise ValueError(f"layer {self.layer_idx}: experts {bad} are not hosted here "
                         f"(hosted: {list(self.expert_ids)})")

    __call__ = forward
