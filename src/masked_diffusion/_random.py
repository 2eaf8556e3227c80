"""Random draws shared by the schedule, the model and the samplers.

Every draw takes an optional ``torch.Generator``. Values are drawn on the generator's
device and then moved, so a CPU generator can drive a model on a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor


def uniform(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> Tensor:
    """Draw float64 uniforms in ``[0, 1)``."""
    target = torch.device(device) if device is not None else torch.device("cpu")
    source = generator.device if generator is not None else target
    return torch.rand(shape, generator=generator, device=source, dtype=torch.float64).to(target)


def stratified_uniform(
    batch_size: int,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> Tensor:
    """Draw ``batch_size`` float64 values in ``[0, 1)``, one per stratum ``[k/B, (k+1)/B)``.

    Strata are assigned by a random permutation, so each value is still marginally
    uniform while the batch covers ``[0, 1)`` evenly.
    """
    target = torch.device(device) if device is not None else torch.device("cpu")
    source = generator.device if generator is not None else target
    u = torch.rand(batch_size, generator=generator, device=source, dtype=torch.float64)
    strata = torch.randperm(batch_size, generator=generator, device=source).to(torch.float64)
    # (B - 1 + u) / B can round up to 1.0 when u is within 2**-53 of 1.
    values = ((strata + u) / batch_size).clamp(max=1.0 - 2.0**-53)
    return values.to(target)
