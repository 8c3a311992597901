"""GPU data plane: nvshmem:// mailboxes with credits, device placement, GPU health.

Everything importable here runs on a CPU-only machine; NVSHMEM device code
(`eaas_kernels.nvshmem_p2p`) is imported only when an NvshmemChannel launches, and pynvml only
when a HealthMonitor starts. The cudaipc:// transport lives in `eaas.transport.cudaipc`.
"""

from eaas.gpu.credits import ChannelLayout, PairState, arrival_target, credit_needed, slot_of
from eaas.gpu.devices import (MULTICAST_OFF, DeviceAssignment, RankInfo, assign_devices,
                              find_rdma_nics, gpu_env, init_rank, wait_event)
from eaas.gpu.health import HealthConfig, HealthMonitor, open_nvml
from eaas.gpu.nvshmem_plane import NvshmemChannel, nvshmem_available
from eaas.gpu.symmetric_plane import NvshmemPlane

__all__ = [
    "ChannelLayout", "PairState", "slot_of", "credit_needed", "arrival_target",
    "NvshmemChannel", "NvshmemPlane", "nvshmem_available",
    "gpu_env", "find_rdma_nics", "assign_devices", "DeviceAssignment", "RankInfo", "init_rank",
    "wait_event", "MULTICAST_OFF", "HealthMonitor", "HealthConfig", "open_nvml",
]
