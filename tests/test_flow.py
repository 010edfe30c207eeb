import pytest
import torch

from tapestry.models.common.flow import (
    euler_sample,
    interpolate,
    sample_timesteps,
    shift_timesteps,
    timestep_schedule,
    velocity_target,
)


def test_interpolation_endpoints_and_target():
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.equal(interpolate(x0, eps, 0.0), x0)
    assert torch.equal(interpolate(x0, eps, 1.0), eps)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = interpolate(x0, eps, t)
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    # v is the time derivative of the path
    h = 1e-3
    dx = (interpolate(x0, eps, 0.5 + h) - interpolate(x0, eps, 0.5 - h)) / (2 * h)
    assert torch.allclose(dx, velocity_target(x0, eps), atol=1e-3)


def test_shift_formula_and_fixed_points():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = 3.0
    assert torch.allclose(shift_timesteps(t, s), s * t / (1 + (s - 1) * t))
    assert torch.equal(shift_timesteps(t, 1.0), t)
    shifted = shift_timesteps(t, s)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert torch.all(shifted[1:-1] > t[1:-1])  # s > 1 moves toward noise
    assert shift_timesteps(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


def test_logit_normal_sampling_is_seeded_and_shifted():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = sample_timesteps(20000, generator=g1)
    b = sample_timesteps(20000, generator=g2)
    assert torch.equal(a, b)
    assert a.min() > 0 and a.max() < 1
    assert a.median().item() == pytest.approx(0.5, abs=0.02)
    shifted = sample_timesteps(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, shift_timesteps(a, 3.0), atol=1e-6)
    assert shifted.median().item() == pytest.approx(0.75, abs=0.02)


def test_schedule_runs_from_noise_to_data():
    sched = timestep_schedule(4, shift=1.0)
    assert torch.allclose(sched, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = timestep_schedule(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and torch.all(shifted[:-1] > shifted[1:])


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (5, 1.0), (7, 3.0)])
def test_euler_with_exact_velocity_recovers_data(steps, shift):
    # For a point mass at x0 the exact velocity is (x_t − x0) / t and every path is a straight
    # line, so Euler is exact at any step count and shift.
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    seen = []

    def velocity(x_t, t):
        assert t.shape == (2,) and torch.all(t > 0)
        return (x_t - x0) / t.view(-1, 1, 1, 1)

    out = euler_sample(velocity, noise, steps, shift, callback=lambda i, x: seen.append(i))
    assert torch.allclose(out, x0, atol=1e-9)
    assert seen == list(range(steps))


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 1 step"):
        timestep_schedule(0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_timesteps(torch.tensor(0.5), 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        interpolate(torch.zeros(2, 3), torch.zeros(2, 4), 0.5)
    with pytest.raises(ValueError, match="velocity returned shape"):
        euler_sample(lambda x, t: x[:, :1], torch.zeros(2, 3), 2)
