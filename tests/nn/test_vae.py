"""KL conv VAE: shapes, input validation, learning on simple images, the measured latent scale."""

import pytest
import torch

from dapolicy.nn.vae import VAE, LatentCodec, VAEConfig

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
