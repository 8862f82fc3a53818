"""KL conv VAE: shapes, input validation, learning on simple images, the measured latent scale."""

import pytest
import torch

from dapolicy.nn.vae import VAE, LatentCodec, VAEConfig, foreground_weights

TINY = VAEConfig(base_channels=8, channel_mults=(1, 2, 2, 2), groups=4)


def squares(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1]: a coloured square of random size/position on a grey background."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 3, size, size), -0.5)
    for i in range(n):
        s = int(torch.randint(size // 4, size // 2, (1,), generator=g))
        r, c = (int(v) for v in torch.randint(0, size - s, (2,), generator=g))
        x[i, :, r : r + s, c : c + s] = (torch.rand(3, 1, 1, generator=g) * 2 - 1)
    return x


def test_default_config_downsamples_64_to_8x8x4():
    vae = VAE()
    assert vae.downsample_factor == 8 and vae.latent_shape(64) == (4, 8, 8)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        assert mean.shape == logvar.shape == (1, 4, 8, 8)
        assert vae.decode(mean).shape == (1, 3, 64, 64)


def test_shapes_tiny_and_non_square():
    vae = VAE(TINY)
    with torch.no_grad():
        z = vae.to_latent(torch.zeros(2, 3, 32, 48))
        assert z.shape == (2, 4, 4, 6)
        assert vae.from_latent(z).shape == (2, 3, 32, 48)


@pytest.mark.parametrize("shape", [(2, 3, 30, 32), (2, 1, 32, 32), (3, 32, 32), (2, 3, 32, 36)])
def test_bad_image_shape_raises(shape):
    vae = VAE(TINY)
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.encode(torch.zeros(shape))


def test_bad_latent_shape_raises():
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        VAE(TINY).decode(torch.zeros(1, 3, 4, 4))


def test_config_validation():
    with pytest.raises(ValueError):
        VAEConfig(base_channels=10, groups=4)  # 10 not divisible by 4
    with pytest.raises(ValueError):
        VAEConfig(channel_mults=())
    with pytest.raises(ValueError):
        VAEConfig(kl_weight=-1.0)
    assert VAEConfig(channel_mults=(1, 2)).downsample_factor == 2


def test_loss_finite_and_reconstruction_improves():
    torch.manual_seed(0)
    vae = VAE(TINY)
    x = squares(4)
    opt = torch.optim.Adam(vae.parameters(), lr=5e-3)
    first = None
    for _ in range(60):
        out = vae.loss(x)
        assert set(out) == {"loss", "recon", "kl"}
        assert all(torch.isfinite(v) for v in out.values())
        first = out["recon"].item() if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        recon = torch.mean((vae.decode(vae.encode(x)[0]) - x) ** 2).item()
    assert recon < 0.3 * first, (first, recon)


def test_fit_latent_scale_gives_unit_std_and_round_trips():
    torch.manual_seed(0)
    vae = VAE(TINY)
    x = squares(16)
    assert vae.latent_scale.item() == 1.0
    scale = vae.fit_latent_scale(x, batch_size=5)  # chunked accumulation
    with torch.no_grad():
        z = vae.to_latent(x)
        assert z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
        assert torch.allclose(z, vae.encode(x)[0] * scale, atol=1e-6)
        assert torch.allclose(vae.from_latent(z), vae.decode(z / scale), atol=1e-6)
    # the scale is part of the saved state
    other = VAE(TINY)
    other.load_state_dict(vae.state_dict())
    assert other.latent_scale.item() == pytest.approx(scale)


def test_implements_latent_codec_interface():
    assert isinstance(VAE(TINY), LatentCodec)


def test_parameter_count_scales_with_width():
    def count(cfg: VAEConfig) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in VAE(cfg).parameters())

    tiny, small = count(TINY), count(VAEConfig())
    assert tiny < 200_000
    assert 1_000_000 < small < 3_000_000
    assert count(VAEConfig(base_channels=64)) > 3 * small


def dots(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames [n, 1, 3, S, S] of a static striped scene with a 2x2 white dot at a random place, and the dot's
    mask [n, 1, 1, S, S]: PushT's agent in miniature."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, 3, size, size), -0.6)
    x[..., ::4, :] = -0.2
    mask = torch.zeros(n, 1, 1, size, size, dtype=torch.bool)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(0, size - 2, (2,), generator=g))
        x[i, 0, :, r:r + 2, c:c + 2] = 1.0
        mask[i, 0, 0, r:r + 2, c:c + 2] = True
    return x, mask


def test_foreground_weights_mark_what_moves_and_not_the_static_scene():
    x, mask = dots(16)
    w = foreground_weights(x, weight=9.0, threshold=0.1)
    assert w.shape == (16, 1, 1, 16, 16)
    assert torch.equal(w > 1, mask)  # the dot, and nothing of the stripes
    assert set(w.unique().tolist()) == {1.0, 10.0}
    with pytest.raises(ValueError, match="cameras"):
        foreground_weights(x[:, 0], 9.0, 0.1)
    with pytest.raises(ValueError, match="foreground_weight"):
        VAEConfig(foreground_weight=-1.0)


def test_a_camera_without_a_static_scene_keeps_unit_weights():
    """A second camera that moves itself (every frame a different random image): nearly every pixel differs
    from the median, so that camera is left unweighted; the fixed camera beside it keeps its dot."""
    x, mask = dots(16)
    moving_camera = torch.rand((16, 1, 3, 16, 16), generator=torch.Generator().manual_seed(1)) * 2 - 1
    w = foreground_weights(torch.cat([x, moving_camera], dim=1), weight=9.0, threshold=0.1)
    assert torch.equal(w[:, 0] > 1, mask[:, 0])
    assert torch.all(w[:, 1] == 1.0)


def test_weighted_loss_reports_the_plain_mse_and_equals_it_for_unit_weights():
    x = squares(4)
    vae = VAE(TINY)
    torch.manual_seed(0)
    plain = vae.loss(x)
    torch.manual_seed(0)
    unit = vae.loss(x, torch.ones(4, 1, 32, 32))
    assert torch.allclose(plain["loss"], unit["loss"]) and torch.allclose(plain["recon"], unit["recon"])
    weight = torch.ones(4, 1, 32, 32)
    weight[..., :8, :8] = 50.0
    torch.manual_seed(0)
    heavy = vae.loss(x, weight)
    assert torch.allclose(heavy["recon"], plain["recon"]) and not torch.allclose(heavy["loss"], plain["loss"])


def test_foreground_weight_keeps_a_small_moving_object_a_plain_mse_erases():
    """The reason for the option: trained alike, the weighted VAE reconstructs the dot far better."""
    x, mask = dots(64)
    errors = {}
    for weight in (0.0, 30.0):
        torch.manual_seed(0)
        cfg = VAEConfig(base_channels=8, channel_mults=(1, 2, 2), groups=4, foreground_weight=weight)
        vae = VAE(cfg)
        opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
        for step in range(60):
            batch = x[(torch.arange(32) + 32 * (step % 2)) % 64]
            w = foreground_weights(batch, weight, 0.1).flatten(0, 1) if weight else None
            loss = vae.loss(batch.flatten(0, 1), w)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            recon = vae.decode(vae.encode(x.flatten(0, 1))[0])
        err = (recon - x.flatten(0, 1)).pow(2).mean(dim=1, keepdim=True)
        errors[weight] = err[mask.flatten(0, 1)].mean().item()
    assert errors[30.0] < 0.5 * errors[0.0], errors
