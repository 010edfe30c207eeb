"""Flow matching as plain functions (rectified flow, the convention of BAGEL / Inset / ILLUME-X).

Time runs from t = 0 (clean data x0) to t = 1 (pure noise ε):

    x_t = (1 − t)·x0 + t·ε          velocity target v = dx_t/dt = ε − x0

Sampling integrates from t = 1 down to t = 0. A shift s > 1 spends more of the schedule (and more
of training) at high noise, which large images need (s = 3.0 at high resolution, 1.0 for tiny
models):  t' = s·t / (1 + (s − 1)·t).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, ...], t [B]) -> v [B, ...]


def _check_shift(shift: float) -> None:
    if not shift > 0:
        raise ValueError(f"timestep shift must be > 0 (1.0 means no shift), got {shift}")


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """Broadcast per-sample times t [B] (or a scalar) against x [B, ...]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must be a scalar or have shape [B] = [{like.shape[0]}], got {list(t.shape)}")
    return t.view(-1, *([1] * (like.dim() - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """x_t = (1 − t)·x0 + t·ε.  x0, noise: [B, ...]; t: [B] or scalar in [0, 1]."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {list(x0.shape)} and noise {list(noise.shape)} differ in shape")
    tb = _per_sample(t, x0)
    return (1 - tb) * x0 + tb * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target of the generation head: v = ε − x0 (independent of t)."""
    return noise - x0


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """t' = s·t / (1 + (s − 1)·t): keeps 0 and 1 fixed, moves mass toward 1 (noise) when s > 1."""
    _check_shift(shift)
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    batch: int,
    shift: float = 1.0,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Training times: logit-normal (sigmoid of N(mean, std²)), then shifted.  Returns t: [batch]."""
    _check_shift(shift)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not std > 0:
        raise ValueError(f"logit-normal std must be > 0, got {std}")
    z = torch.randn(batch, generator=generator, device=device, dtype=torch.float32) * std + mean
    return shift_timesteps(torch.sigmoid(z), shift).to(dtype)


def timestep_schedule(steps: int, shift: float = 1.0, *, device=None, dtype=torch.float32) -> Tensor:
    """Sampling times from 1 (noise) to 0 (data), shifted.  Returns [steps + 1], decreasing."""
    _check_shift(shift)
    if steps < 1:
        raise ValueError(f"the sampler needs at least 1 step, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    return shift_timesteps(t, shift).to(dtype)


def euler_step(x_t: Tensor, v: Tensor, t: float | Tensor, t_next: float | Tensor) -> Tensor:
    """One Euler step along dx/dt = v from t to t_next (t_next < t when sampling)."""
    return x_t + (t_next - t) * v


def euler_sample(
    velocity: VelocityFn,
    noise: Tensor,
    steps: int,
    shift: float = 1.0,
    *,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Integrate from pure noise (t = 1) to data (t = 0) with `steps` Euler steps.

    velocity(x_t, t) gets x_t: [B, ...] and t: [B] (all equal) and returns v: [B, ...].
    callback(i, x) is called after step i (0-based) — progress bars and streaming hook in here.
    """
    schedule = timestep_schedule(steps, shift, device=noise.device)
    x = noise
    batch = noise.shape[0]
    for i in range(steps):
        t, t_next = schedule[i], schedule[i + 1]
        v = velocity(x, t.expand(batch).to(noise.dtype))
        if v.shape != x.shape:
            raise ValueError(f"velocity returned shape {list(v.shape)}, expected {list(x.shape)}")
        x = euler_step(x, v, t.to(x.dtype), t_next.to(x.dtype))
        if callback is not None:
            callback(i, x)
    return x
