"""OneForcingScheduler: the shift-5 grid, warping, x0 from flow, re-noising, config round trip."""

import pytest
import torch

from oneforcing import OneForcingScheduler


def test_grid_and_warping():
    s = OneForcingScheduler()
    assert s.grid_timesteps[0] == 1000 and 4.9 < s.grid_timesteps[-1] < 5.0 and len(s.grid_timesteps) == 1000
    assert s.warp([1000]).tolist() == [1000.0]
    warped = s.warp([1000, 750, 500, 250])
    assert torch.allclose(warped, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), atol=1e-3)
    unwarped = OneForcingScheduler(warp_timesteps=False).prepare_timesteps([1000, 750, 500, 250])
    assert unwarped.tolist() == [1000.0, 750.0, 500.0, 250.0]


def test_first_block_list():
    s = OneForcingScheduler(denoising_timesteps=[1000], first_block_timesteps=[1000, 750, 500, 250])
    assert len(s.block_timesteps(0)) == 4 and s.block_timesteps(1).tolist() == [1000.0]
    assert s.block_timesteps(0, first_block_timesteps=[1000, 500]).shape == (2,)
    assert s.block_timesteps(3, denoising_timesteps=[1000, 500]).shape == (2,)


def test_x0_and_renoise():
    s = OneForcingScheduler()
    x0 = torch.randn(2, 16, 3, 4, 4)
    noise = torch.randn_like(x0)
    xt = s.add_noise(x0, noise, 625.0)
    assert torch.allclose(xt, 0.375 * x0 + 0.625 * noise, atol=1e-6)
    flow = noise - x0
    assert torch.allclose(s.x0_from_flow(xt, flow, 625.0), x0, atol=1e-5)
    per_frame = torch.tensor([[1000.0, 500.0, 0.0]] * 2)
    assert torch.allclose(s.add_noise(x0, noise, per_frame)[:, :, 2], x0[:, :, 2])


def test_step_renoises_from_generator_reproducibly():
    s = OneForcingScheduler()
    x = torch.randn(1, 16, 1, 4, 4)
    v = torch.randn_like(x)
    a = s.step(v, 1000.0, x, next_timestep=937.5, generator=torch.Generator().manual_seed(3)).prev_sample
    b = s.step(v, 1000.0, x, next_timestep=937.5, generator=torch.Generator().manual_seed(3)).prev_sample
    c = s.step(v, 1000.0, x, next_timestep=937.5, generator=torch.Generator().manual_seed(4)).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)
    out = s.step(v, 1000.0, x)
    assert torch.equal(out.prev_sample, out.pred_original_sample)


def test_bad_lists():
    s = OneForcingScheduler()
    for bad in ([], [0], [1200], [500, 750]):
        with pytest.raises(ValueError):
            s.prepare_timesteps(bad)


def test_config_round_trip(tmp_path):
    s = OneForcingScheduler(denoising_timesteps=[1000, 500], first_block_timesteps=[1000, 750, 500, 250], shift=3.0)
    s.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    again = OneForcingScheduler.from_pretrained(tmp_path)
    assert list(again.config.denoising_timesteps) == [1000, 500] and again.config.shift == 3.0
    assert torch.equal(again.block_timesteps(0), s.block_timesteps(0))


def test_scalar_timesteps_stay_on_the_host_and_give_the_same_numbers():
    """A Python-number timestep becomes a 0-d CPU tensor, which GPU arithmetic takes as a scalar: no host-to-device
    copy (each one synchronised the host with the GPU once per denoising step). Same values as a per-sample tensor."""
    s = OneForcingScheduler()
    g = torch.Generator().manual_seed(0)
    sample, flow, noise = (torch.randn(2, 4, 3, 5, 6, generator=g) for _ in range(3))
    sigma = s._sigma_like(731.25, sample)
    assert sigma.ndim == 0 and sigma.device.type == "cpu" and sigma.dtype == torch.float32
    per_sample = torch.full((2,), 731.25)
    assert torch.equal(s.x0_from_flow(sample, flow, 731.25), s.x0_from_flow(sample, flow, per_sample))
    assert torch.equal(s.add_noise(sample, noise, 731.25), s.add_noise(sample, noise, per_sample))
    assert torch.equal(s.add_noise(sample, noise, torch.tensor(731.25)), s.add_noise(sample, noise, 731.25))
    # per-sample lists still broadcast over the batch
    assert torch.equal(s.x0_from_flow(sample, flow, [731.25, 731.25]), s.x0_from_flow(sample, flow, per_sample))
