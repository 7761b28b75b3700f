"""analysis.metrics.cka: linear CKA against an independent Gram-matrix formula, streaming against
one shot, and layer_cka on real encoders — ours, and a timm ViT with registers."""

from __future__ import annotations

import pytest
import torch

from analysis import metrics as M
from conftest import IMG, tiny_model, tiny_timm_vit


def _gram_cka(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Independent reference: HSIC with centred Gram matrices (Kornblith et al. Eq. 3)."""
    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, Lm = X.double() @ X.double().T, Y.double() @ Y.double().T
    hsic = lambda A, B: torch.trace(A @ H @ B @ H)  # noqa: E731
    return hsic(K, Lm) / torch.sqrt(hsic(K, K) * hsic(Lm, Lm))


def test_linear_cka_properties():
    torch.manual_seed(2)
    X = torch.randn(60, 10)
    Y = X @ torch.randn(10, 7) + 0.5 * torch.randn(60, 7)
    assert M.linear_cka(X, X).item() == pytest.approx(1.0, abs=1e-12)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    base = M.linear_cka(X, Y)
    assert M.linear_cka(X.double() @ Q * 3.7, Y).item() == pytest.approx(base.item(), abs=1e-12)
    assert M.linear_cka(X, Y.double() * 0.01 + 5).item() == pytest.approx(base.item(), abs=1e-12)
    torch.testing.assert_close(base, _gram_cka(X, Y))
    assert 0 < base < 1
    # not invariant to a non-orthogonal, non-isotropic map
    assert abs(M.linear_cka(X * torch.linspace(0.1, 10, 10), Y) - base) > 1e-3


def test_streaming_cka_equals_one_shot():
    torch.manual_seed(3)
    n = 90
    A = [torch.randn(n, 6, dtype=torch.float64) + 1e7, torch.randn(n, 5)]  # large mean: needs the shift
    B = [A[0] @ torch.randn(6, 4, dtype=torch.float64) + torch.randn(n, 4), torch.randn(n, 3), A[1][:, :2] ** 2]
    acc = M.StreamingCKA()
    for s in (slice(0, 7), slice(7, 50), slice(50, n)):
        acc.update([a[s] for a in A], [b[s] for b in B])
    out = acc.compute()
    assert out.shape == (2, 3) and acc.n == n
    expected = torch.tensor([[M.linear_cka(a, b).item() for b in B] for a in A], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_layer_cka_between_real_models():
    mae = tiny_model("mae_vit_tiny_patch8").train()
    rm = tiny_model("rmae_vit_tiny_patch8", depth=3)
    images = [torch.randn(3, 3, IMG, IMG) for _ in range(2)]
    same = M.layer_cka(mae, mae, images, tokens="patch")
    torch.testing.assert_close(torch.diagonal(same), torch.ones(2, dtype=torch.float64))
    cross = M.layer_cka(mae, rm, images, tokens="mean")
    assert cross.shape == (2, 3) and ((cross >= 0) & (cross <= 1 + 1e-9)).all()
    assert mae.training and not rm.training  # modes restored
    assert M.layer_cka(mae, rm, images, tokens="mean", max_batches=1).shape == (2, 3)
    with pytest.raises(ValueError, match="tokens must be"):
        M.layer_cka(mae, rm, images, tokens="all")


def _hooked_block_outputs(model, images: torch.Tensor) -> list[torch.Tensor]:
    """Independent reference: every block's raw output (no final norm), by forward hooks."""
    outs: list[torch.Tensor] = []
    handles = [blk.register_forward_hook(lambda _m, _i, o: outs.append(o)) for blk in model.blocks]
    with torch.no_grad():
        model.forward_features(images)
    for h in handles:
        h.remove()
    return outs


@pytest.mark.parametrize("tokens", ["patch", "cls", "mean"])
def test_layer_cka_respects_every_models_prefix_tokens(tokens):
    """Ours (cls) against a timm ViT with cls + 4 registers: patch examples and mean pooling must
    leave out the 5 prefix tokens of the one and the single cls token of the other."""
    ours, vit_registers = tiny_model(), tiny_timm_vit(reg_tokens=4)
    images = [torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    pick = {"patch": lambda x, P: x[:, P:].reshape(-1, x.shape[-1]), "cls": lambda x, P: x[:, 0],
            "mean": lambda x, P: x[:, P:].mean(1)}[tokens]
    acc = M.StreamingCKA()
    for x in images:
        acc.update([pick(o, 1) for o in _hooked_block_outputs(ours, x)],
                   [pick(o, 5) for o in _hooked_block_outputs(vit_registers, x)])
    torch.testing.assert_close(M.layer_cka(ours, vit_registers, images, tokens=tokens), acc.compute())


def test_layer_cka_across_input_sizes_pairs_each_image_with_itself():
    """``batches_b``: model_b sees the same images at its own size. Known answer from hooks on each
    model with its own images; pairing image i with image i is what makes the same-layer CKA of one
    encoder at two sizes high — the same images in another order give a low one."""
    small = tiny_model("mae_vit_tiny_patch8", seed=0)
    big = tiny_model("mae_vit_tiny_patch8", seed=0, img_size=2 * IMG)  # same weights, sin-cos pos at 64²
    g = torch.Generator().manual_seed(0)
    # images that differ from each other as a whole (colour, brightness), with texture inside
    base = [(torch.rand(8, 3, 1, 1, generator=g) + 0.3 * torch.rand(8, 3, IMG, IMG, generator=g)) for _ in range(3)]
    up = [torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest") for x in base]
    acc = M.StreamingCKA()
    for a, b in zip(base, up):
        acc.update([o[:, 1:].mean(1) for o in _hooked_block_outputs(small, a)],
                   [o[:, 1:].mean(1) for o in _hooked_block_outputs(big, b)])
    paired = M.layer_cka(small, big, base, tokens="mean", batches_b=up)
    torch.testing.assert_close(paired, acc.compute())
    shuffled = M.layer_cka(small, big, base, tokens="mean", batches_b=[x.flip(0) for x in up])
    assert torch.diagonal(paired).min() > 0.95 and torch.diagonal(shuffled).max() < 0.5
    with pytest.raises(ValueError, match="same images"):
        M.layer_cka(small, big, base, tokens="mean", batches_b=[x[:4] for x in up])
