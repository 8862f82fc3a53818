import numpy as np
import torch

from dapolicy.training.latents import cached_latents


class FakeEncoder:
    """Stands in for a policy's frozen VAE: latents = scale * mean pixel value, with a call counter."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale, self.frames = scale, 0

    def encode_latents(self, images):
        self.frames += len(images)
        x = torch.as_tensor(images).float().mean(dim=(-3, -2, -1))  # [N, C]
        return (self.scale * x)[..., None, None, None].expand(-1, -1, 4, 2, 2)


def test_cache_is_reused_then_invalidated(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 2, 8, 8, 3), dtype=np.uint8)
    ends = np.array([10, 30])
    enc = FakeEncoder()
    z = cached_latents(enc, images, ends, tmp_path, batch=7)
    assert z.shape == (30, 2, 4, 2, 2) and z.dtype == np.float32 and enc.frames == 30
    enc.frames = 0
    again = cached_latents(enc, images, ends, tmp_path, batch=7)
    assert np.array_equal(again, z) and enc.frames <= 8  # only the probe frames were re-encoded
    changed = FakeEncoder(scale=2.0)  # a retrained VAE / new latent scale
    z2 = cached_latents(changed, images, ends, tmp_path, batch=7)
    assert changed.frames > 8 and np.allclose(z2, 2 * z)
    more = np.concatenate([images, images[:5]])  # the data changed
    other = FakeEncoder(scale=2.0)
    assert len(cached_latents(other, more, np.array([10, 35]), tmp_path)) == 35
