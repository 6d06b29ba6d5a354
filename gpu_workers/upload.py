"""Host data to the device without a stream synchronisation.

`torch.tensor(values, device="cuda")` and a plain `.to("cuda")` copy from pageable memory and then wait for the
whole stream, i.e. for every step already queued on the GPU. With overlap scheduling that wait is exactly the time
the host should spend preparing the next step, so every per-step copy goes through pinned memory instead."""
from __future__ import annotations

import numpy as np
import torch


def upload(values, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """values (a list, numpy array or CPU tensor) as a tensor on device, queued on the current stream."""
    host = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.as_tensor(values)
    host = host.to(dtype)
    if device.type != "cuda":
        return host.to(device)
    # pin_memory() draws from torch's caching host allocator, which keeps the block until the copy has run.
    return host.pin_memory().to(device, non_blocking=True)


def pinned(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor in pinned memory when CUDA is present (FlashInfer copies its plan inputs asynchronously)."""
    return t.pin_memory() if torch.cuda.is_available() else t
