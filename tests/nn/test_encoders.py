"""Image / latent encoders and the random-shift augmentation."""

import pytest
import torch

from dapolicy.nn.encoders import (
    LatentPatchTokenizer,
    ResNetGN,
    ResNetGNConfig,
    SpatialSoftmax,
    random_shift,
    sincos_pos_embed_2d,
)


def test_resnet_tokens_at_32_and_64_px():
    torch.manual_seed(0)
    enc = ResNetGN(ResNetGNConfig(width=8, n_groups=4, out_dim=24))
    for size, n in ((64, 16), (32, 4)):
        x = torch.rand(2, 3, size, size) * 2 - 1
        assert enc(x).shape == (2, n, 24)
        assert enc.num_tokens(size) == n
    assert enc.feature_map(torch.zeros(1, 3, 64, 64)).shape == (1, 64, 4, 4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())


def test_resnet18_like_depth_and_learned_pos():
    cfg = ResNetGNConfig(width=8, blocks=(2, 2, 2, 2), n_groups=4, out_dim=16, image_size=32, pos_embed="learned")
    enc = ResNetGN(cfg)
    assert sum(len(s) for s in enc.stages) == 8
    assert enc(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 16)
    with pytest.raises(ValueError, match="learned position embedding"):
        enc(torch.zeros(1, 3, 64, 64))


def test_resnet_rejects_bad_input():
    enc = ResNetGN(ResNetGNConfig(width=8, n_groups=4, out_dim=16))
    with pytest.raises(ValueError, match=r"\[B, 3, S, S\]"):
        enc(torch.zeros(1, 64, 64, 3))
    with pytest.raises(ValueError, match="divisible by 16"):
        enc(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="float"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError):
        ResNetGNConfig(width=10, n_groups=4)


def test_spatial_softmax_on_resnet_map():
    enc = ResNetGN(ResNetGNConfig(width=8, n_groups=4, out_dim=16))
    fmap = enc.feature_map(torch.rand(2, 3, 32, 32))
    kp = SpatialSoftmax(fmap.shape[1], num_kp=5)(fmap)
    assert kp.shape == (2, 10) and kp.abs().max() <= 1.0


def test_latent_patch_tokenizer():
    tok = LatentPatchTokenizer(latent_channels=4, patch_size=2, out_dim=32, latent_size=8)
    z = torch.randn(3, 4, 8, 8)
    out = tok(z)
    assert out.shape == (3, 16, 32) and tok.num_tokens == 16
    # patch (0, 1) covers latent rows 0-1, cols 2-3: changing only there changes only token 1
    z2 = z.clone()
    z2[:, :, 0:2, 2:4] += 1.0
    diff = (tok(z2) - out).abs().amax(dim=(0, 2))
    assert diff[1] > 0 and diff[torch.arange(16) != 1].max() == 0
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        tok(torch.randn(3, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        tok(torch.randn(3, 4, 7, 8))
    learned = LatentPatchTokenizer(4, 2, 32, latent_size=8, pos_embed="learned")
    assert learned(z).shape == (3, 16, 32)


def test_sincos_pos_embed_distinct():
    pe = sincos_pos_embed_2d(4, 4, 16)
    assert pe.shape == (16, 16)
    assert torch.cdist(pe, pe).add(torch.eye(16)).min() > 0  # every position distinct


def test_random_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    assert random_shift(x, pad=0) is x
    y = random_shift(x, pad=4, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.equal(x, y)
    # every output is an integer translation of its input with replicated borders
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="replicate")
    for i in range(8):
        hits = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(xp[i, :, dy : dy + 32, dx : dx + 32], y[i])
        ]
        assert hits
    # per-sample shifts differ and are reproducible with the same generator
    y2 = random_shift(x, pad=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, y2)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        random_shift(x[0])
