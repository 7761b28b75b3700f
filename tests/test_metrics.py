"""analysis.metrics against hand-built cases with known answers (attention, DINO, instance-awareness;
several prefix tokens), then every metric on real tiny models: ours, and ours exported to timm.
CKA and object discovery: test_metrics_cka.py, test_metrics_discovery.py."""

from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch
from safetensors.torch import load_file

import rmae
from analysis import encoder
from analysis import metrics as M
from analysis.groundtruth import boxes_from_instances, patch_ownership
from conftest import IMG, tiny_model

P = 8  # patch size used by the hand-built cases


def _with_cls(patch_rows: torch.Tensor, cls_mass: float = 0.3) -> torch.Tensor:
    """Embed patch→patch rows ``[B, h, L, L]`` into a ``[B, h, 1+L, 1+L]`` map whose every row
    also puts ``cls_mass`` on the cls key (so metrics must drop cls and renormalise)."""
    B, h, L, _ = patch_rows.shape
    a = torch.zeros(B, h, 1 + L, 1 + L, dtype=torch.float64)
    a[..., 0] = cls_mass
    a[..., 1:, 1:] = (1 - cls_mass) * patch_rows.double()
    a[:, :, 0, 1:] = (1 - cls_mass) / L  # cls query: uniform over patches
    return a


def _with_register(one_prefix: torch.Tensor, register_mass: float = 0.4) -> torch.Tensor:
    """``[B, h, 1+L, 1+L]`` (cls first) → ``[B, h, 2+L, 2+L]`` with a register token at index 1
    (a DINOv2 register or DeiT's distillation token): every row moves ``register_mass`` of its
    weight onto the register key, and the register's own row is a one-hot on the last patch (if a
    metric read it as a query, or kept its key, the answer would change)."""
    B, h, N, _ = one_prefix.shape
    a = torch.zeros(B, h, N + 1, N + 1, dtype=torch.float64)
    rows = [0, *range(2, N + 1)]  # cls and the patches keep their order around the register
    a[:, :, rows, 0] = (1 - register_mass) * one_prefix[..., 0].double()
    a[:, :, rows, 1] = register_mass
    a[:, :, rows, 2:] = (1 - register_mass) * one_prefix[..., 1:].double()
    a[:, :, 1, -1] = 1.0
    return a


def _uniform(B: int, h: int, L: int) -> torch.Tensor:
    return _with_cls(torch.full((B, h, L, L), 1.0 / L))


# ------------------------------------------------------------------------------------------
# distance, entropy, NMI


@pytest.mark.parametrize("grid, patch", [((3, 4), 8), ((1, 2), 16), ((5, 5), (4, 6))])
def test_uniform_attention_distance_is_mean_pairwise_distance(grid, patch):
    gh, gw = grid
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    centres = [((r + 0.5) * ph, (c + 0.5) * pw) for r in range(gh) for c in range(gw)]
    expected = sum(math.dist(a, b) for a, b in itertools.product(centres, centres)) / len(centres) ** 2
    d = M.mean_attention_distance(_uniform(2, 3, gh * gw), grid, patch)
    assert d.shape == (2, 3) and d.dtype == torch.float64
    torch.testing.assert_close(d, torch.full((2, 3), expected, dtype=torch.float64))
    if grid == (1, 2):
        assert expected == pytest.approx(8.0)  # (0 + 16) / 2


def test_attention_distance_of_local_maps():
    L = 12
    eye = torch.eye(L).expand(1, 1, L, L)
    assert M.mean_attention_distance(_with_cls(eye), (3, 4), P).abs().max() == 0
    # every query attends its right neighbour (wrapping rows use the left neighbour): distance = P
    right = torch.zeros(1, 1, L, L)
    for i in range(L):
        j = i + 1 if (i % 4) < 3 else i - 1
        right[0, 0, i, j] = 1
    torch.testing.assert_close(M.mean_attention_distance(_with_cls(right), (3, 4), P),
                               torch.full((1, 1), float(P), dtype=torch.float64))


def test_entropy_uniform_and_one_hot():
    L = 16
    torch.testing.assert_close(M.attention_entropy(_uniform(2, 3, L)),
                               torch.full((2, 3), math.log(L), dtype=torch.float64))
    eye = torch.eye(L).expand(2, 3, L, L)
    assert M.attention_entropy(_with_cls(eye)).abs().max() < 1e-12


def test_nmi_collapse_and_identity():
    L = 9
    shared = torch.softmax(torch.randn(L), 0)
    collapsed = _with_cls(shared.expand(2, 2, L, L))
    assert M.attention_nmi(collapsed).abs().max() < 1e-12
    eye = _with_cls(torch.eye(L).expand(2, 2, L, L))
    torch.testing.assert_close(M.attention_nmi(eye), torch.ones(2, 2, dtype=torch.float64))
    perm = torch.eye(L)[torch.randperm(L)].expand(1, 1, L, L)  # distinct one-hot keys: still 1
    torch.testing.assert_close(M.attention_nmi(_with_cls(perm)), torch.ones(1, 1, dtype=torch.float64))
    # total collapse onto one key: H(K) = 0, defined as 0
    one_key = torch.zeros(1, 1, L, L)
    one_key[..., 3] = 1
    assert M.attention_nmi(_with_cls(one_key)).item() == 0


def test_nmi_equals_park_et_al_formula():
    """Direct transcription of Park et al.'s definition (p(q) uniform, no prefix tokens)."""
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(3, 4, 10, 10, dtype=torch.float64) * 2, dim=-1)
    q = a.shape[-2]
    pq = torch.full(a.shape[:2] + (q,), 1.0 / q, dtype=torch.float64)
    pk = (a * pq[..., None]).sum(-2)
    mi = (a * pq[..., None] * torch.log(a / pk[..., None, :])).sum((-2, -1))
    eq = -(pq * pq.log()).sum(-1)
    ek = -(pk * pk.log()).sum(-1)
    torch.testing.assert_close(M.attention_nmi(a, num_prefix=0), mi / torch.sqrt(eq * ek))


def test_layer_sequences_stack_at_dim_1():
    layers = [_uniform(2, 3, 16), _with_cls(torch.eye(16).expand(2, 3, 16, 16))]
    d = M.mean_attention_distance(layers, (4, 4), P)
    assert d.shape == (2, 2, 3)
    assert d[:, 1].abs().max() == 0 and d[:, 0].min() > 0
    torch.testing.assert_close(M.attention_entropy(torch.stack(layers)), M.attention_entropy(layers))
    with pytest.raises(ValueError, match="patches"):
        M.mean_attention_distance(layers, (3, 4), P)  # grid does not match N


# ------------------------------------------------------------------------------------------
# thresholding


def test_keep_mass_threshold_exact_cases():
    def t(values):  # float64, so decimal literals mean what they say (0.3f + 0.4f ≠ 0.7·total in float32)
        return torch.tensor(values, dtype=torch.float64)

    assert M.keep_mass_threshold(t([0.5, 0.3, 0.2]), 0.6).tolist() == [True, True, False]
    assert M.keep_mass_threshold(t([0.4, 0.2, 0.4]), 0.8).tolist() == [True, False, True]
    # exact prefix sum 0.4 + 0.3 = 0.7 reaches 0.7: two kept; tie 0.3/0.3 → lower index first
    assert M.keep_mass_threshold(t([0.3, 0.3, 0.4]), 0.7).tolist() == [True, False, True]
    assert M.keep_mass_threshold(torch.ones(5), 0.6).tolist() == [True, True, True, False, False]
    assert M.keep_mass_threshold(t([0.0, 0.5, 0.5, 0.0]), 1.0).tolist() == [False, True, True, False]
    assert not M.keep_mass_threshold(torch.zeros(4), 0.6).any()
    assert not M.keep_mass_threshold(t([1.0, 2.0]), 0.0).any()
    grid = torch.tensor([[[0.1, 0.6], [0.2, 0.1]]])
    assert M.keep_mass_threshold(grid, 0.7, ndim=2).tolist() == [[[False, True], [True, False]]]
    with pytest.raises(ValueError, match="non-negative"):
        M.keep_mass_threshold(t([0.5, -0.1]))


@pytest.mark.parametrize("mass", [0.1, 0.6, 0.9, 1.0])
def test_keep_mass_threshold_keeps_mass_minimally(mass):
    torch.manual_seed(1)
    maps = torch.rand(50, 37) ** 3  # skewed values
    keep = M.keep_mass_threshold(maps, mass)
    total = maps.double().sum(-1)
    kept = (maps.double() * keep).sum(-1)
    assert (kept >= mass * total * (1 - 1e-9)).all()  # reaches the mass …
    smallest_kept = torch.where(keep, maps, torch.full_like(maps, float("inf"))).min(-1).values.double()
    assert (kept - smallest_kept < mass * total).all()  # … and no entry could be dropped
    largest_dropped = torch.where(keep, torch.full_like(maps, -1.0), maps).max(-1).values
    assert (largest_dropped <= smallest_kept.float()).all()  # the kept set is a top set


# ------------------------------------------------------------------------------------------
# instance-awareness


def _two_instances() -> torch.Tensor:
    """[1, 16, 16] map on a 4×4 grid of 4-px patches: instance 1 = grid block (0:2, 0:2),
    instance 2 = grid block (2:4, 2:4) but patch (2, 2) only 12/16 covered, rest background."""
    inst = torch.zeros(1, 16, 16, dtype=torch.long)
    inst[0, 0:8, 0:8] = 1
    inst[0, 8:16, 8:16] = 2
    inst[0, 8, 8:12] = 0  # first pixel row of patch (2, 2) is background: 12/16 instance 2
    return inst


def _owner_grid() -> torch.Tensor:
    owner, _ = patch_ownership(_two_instances(), 4)
    return owner[0].reshape(-1)


def test_patch_ownership_majority_purity_and_ties():
    """The ownership instance-awareness counts with (analysis.groundtruth)."""
    inst = _two_instances()
    owner, purity = patch_ownership(inst, 4)
    assert owner.shape == (1, 4, 4)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]])
    assert torch.equal(owner[0], expected)
    assert purity[0, 2, 2].item() == pytest.approx(12 / 16) and purity[0, 0, 0] == 1
    tie = torch.zeros(4, 4, dtype=torch.long)
    tie[:2] = 7  # half the pixels: background (lower id) wins the tie
    o, p = patch_ownership(tie, 4)
    assert o.item() == 0 and p.item() == 0.5
    three = torch.tensor([[3, 3, 5, 5], [3, 3, 5, 0], [0, 0, 0, 0], [5, 5, 9, 9]])
    o, p = patch_ownership(three, 4)  # 5 has 5 px, 0 has 5 px, 3 has 4 → tie 0/5 → 0
    assert o.item() == 0
    sparse = torch.full((1, 8, 8), 100_000, dtype=torch.long)  # sparse large ids are fine
    assert patch_ownership(sparse, 4)[0].unique().item() == 100_000


def test_attention_on_own_instance_gives_mass_one_leak_zero_jaccard_one():
    owner = _owner_grid()
    L = owner.numel()
    rows = torch.full((L, L), 1.0 / L)
    for q in range(L):
        if owner[q] > 0:
            same = (owner == owner[q]).double()
            rows[q] = same / same.sum()
    attn = _with_cls(rows.expand(1, 2, L, L))
    res = M.instance_awareness(attn, _two_instances(), 4, mass=1.0)
    one = torch.ones(1, dtype=torch.float64)
    torch.testing.assert_close(res.mass, one)
    torch.testing.assert_close(res.leak, 0 * one)
    torch.testing.assert_close(res.background, 0 * one)
    torch.testing.assert_close(res.jaccard, one)
    assert res.num_queries.tolist() == [8]
    # DINO's 60 %: a map uniform over a 4-patch instance keeps ceil(0.6·4) = 3 patches → J = 3/4
    res60 = M.instance_awareness(attn, _two_instances(), 4)
    torch.testing.assert_close(res60.jaccard, torch.full((1,), 0.75, dtype=torch.float64))


def test_attention_spread_to_other_instance_gives_leak():
    owner = _owner_grid()
    L = owner.numel()
    fg, bg = owner > 0, owner == 0

    def rows_for(own_w: float, other_w: float, bg_w: float) -> torch.Tensor:
        rows = torch.full((L, L), 1.0 / L)
        for q in range(L):
            if fg[q]:
                same = (owner == owner[q]).double()
                other = (fg & (owner != owner[q])).double()
                rows[q] = own_w * same / same.sum() + other_w * other / other.sum() + bg_w * bg.double() / bg.sum()
        return rows

    heads = torch.stack([rows_for(0.7, 0.2, 0.1), rows_for(0.25, 0.5, 0.25)])
    attn = _with_cls(heads[None])
    res = M.instance_awareness(attn, _two_instances(), 4, heads="each")
    assert res.mass.shape == (1, 2)
    torch.testing.assert_close(res.mass[0], torch.tensor([0.7, 0.25], dtype=torch.float64))
    torch.testing.assert_close(res.leak[0], torch.tensor([0.2, 0.5], dtype=torch.float64))
    torch.testing.assert_close(res.background[0], torch.tensor([0.1, 0.25], dtype=torch.float64))
    mean = M.instance_awareness(attn, _two_instances(), 4)  # head-mean = mean of per-head masses
    torch.testing.assert_close(mean.mass, res.mass.mean(-1))
    torch.testing.assert_close(mean.leak, res.leak.mean(-1))
    # purity: patch (2, 2) is 12/16 instance 2 → excluded as a query at min_purity 0.8
    strict = M.instance_awareness(attn, _two_instances(), 4, min_purity=0.8)
    assert strict.num_queries.tolist() == [7] and mean.num_queries.tolist() == [8]


def test_instance_awareness_per_image_nan_and_pooling():
    inst = torch.cat([_two_instances(), torch.zeros(1, 16, 16, dtype=torch.long)])
    L = 16
    attn = [_uniform(2, 3, L), _uniform(2, 3, L)]
    res = M.instance_awareness(attn, inst, 4)
    assert res.mass.shape == (2, 2) and res.num_queries.tolist() == [8, 0]
    assert torch.isnan(res.mass[1]).all()  # no instance → undefined, not 0
    torch.testing.assert_close(res.mass[0], torch.full((2,), 4 / 16, dtype=torch.float64))  # uniform = share
    pooled = res.pooled()
    torch.testing.assert_close(pooled["instance_mass"], res.mass[0])
    assert set(res.as_dict()) == {"instance_mass", "instance_leak", "background_mass", "instance_jaccard"}
    both = M.InstanceAwareness.cat([res, res])
    assert both.mass.shape == (4, 2) and both.num_queries.tolist() == [8, 0, 8, 0]
    each = M.instance_awareness(attn, inst, 4, heads="each")
    assert each.jaccard.shape == (2, 2, 3)


def test_cls_jaccard_follows_dinos_protocol():
    """Per head, at pixel resolution, the best head for each object, averaged over objects."""
    # 8 × 16 px, 4-px patches: a 2 × 4 grid; object 1 = patches 0, 1; object 2 = patches 6, 7
    inst = torch.zeros(1, 8, 16, dtype=torch.long)
    inst[0, :4, :8], inst[0, 4:, 8:] = 1, 2
    L = 8

    def cls_rows(*rows):
        a = torch.full((1, len(rows), 1 + L, 1 + L), 1.0 / (1 + L), dtype=torch.float64)
        for h, patches in enumerate(rows):
            a[0, h, 0] = 0.0
            a[0, h, 0, [1 + p for p in patches]] = 1.0 / len(patches)
        return a

    # head 0 on object 1, head 1 on object 2: each object has its perfect head → 1. (The head-mean
    # map against the union of objects — not DINO's protocol — would keep 3 of 4 equal patches: 0.75.)
    assert M.cls_jaccard(cls_rows([0, 1], [6, 7]), inst, 4).item() == pytest.approx(1.0)
    # best head per object: head 0 covers both objects, head 1 only object 1 →
    # J1 = max(2/4, 1) = 1, J2 = max(2/4, 0) = 0.5 → 0.75
    assert M.cls_jaccard(cls_rows([0, 1, 6, 7], [0, 1]), inst, 4, mass=1.0).item() == pytest.approx(0.75)
    # pixel resolution: object 1 loses the left half of patch 0 → 24 of the 32 kept pixels
    half = inst.clone()
    half[0, :4, :2] = 0
    assert M.cls_jaccard(cls_rows([0, 1], [6, 7]), half, 4).item() == pytest.approx((24 / 32 + 1) / 2)
    # no objects: undefined; a sequence of layers stacks at dim 1
    j = M.cls_jaccard([cls_rows([0, 1], [6, 7])] * 2, torch.zeros_like(inst), 4)
    assert j.shape == (1, 2) and torch.isnan(j).all()
    with pytest.raises(ValueError, match="integer instance map"):
        M.cls_jaccard(cls_rows([0]), inst > 0, 4)


# ------------------------------------------------------------------------------------------
# more than one prefix token


def test_a_register_token_is_left_out_like_cls():
    """cls + one register (or DeiT's distillation token) in front of the patches: with
    ``num_prefix=2`` every metric reads the same patch block, and the same cls row, as the
    one-prefix map the two-prefix map was built from (its register key and row are ignored)."""
    torch.manual_seed(7)
    inst = _two_instances().expand(2, -1, -1)  # 16 × 16 px, 4-px patches: a 4 × 4 grid
    L = 16
    one = _with_cls(torch.softmax(torch.randn(2, 3, L, L, dtype=torch.float64) * 2, -1))
    fg = (_owner_grid() > 0).double()
    one[:, :, 0, 1:] = 0.7 * fg / fg.sum()  # cls attends exactly the objects
    two = _with_register(one)
    assert two.shape[-1] == 2 + L and torch.allclose(two.sum(-1), torch.ones(2, 3, 2 + L, dtype=torch.float64))

    torch.testing.assert_close(M.mean_attention_distance(two, (4, 4), 4, num_prefix=2),
                               M.mean_attention_distance(one, (4, 4), 4))
    torch.testing.assert_close(M.attention_entropy(two, num_prefix=2), M.attention_entropy(one))
    torch.testing.assert_close(M.attention_nmi(two, num_prefix=2), M.attention_nmi(one))
    a, b = M.instance_awareness(two, inst, 4, heads="each", num_prefix=2), M.instance_awareness(one, inst, 4, heads="each")
    for key, value in a.as_dict().items():
        torch.testing.assert_close(value, b.as_dict()[key], msg=key)
    j = M.cls_jaccard(two, inst, 4, mass=1.0, num_prefix=2)
    # cls attends both objects' 8 patches (128 px): object 1 has 64 px in them, object 2 (a pixel
    # row short) 60 px → J = (64/128 + 60/128) / 2 at pixel resolution
    torch.testing.assert_close(j, torch.full((2,), (64 / 128 + 60 / 128) / 2, dtype=torch.float64))
    torch.testing.assert_close(j, M.cls_jaccard(one, inst, 4, mass=1.0))

    # the register read as a patch: the grid does not fit, or the numbers move
    with pytest.raises(ValueError, match="1 prefix . 17 patches"):
        M.mean_attention_distance(two, (4, 4), 4, num_prefix=1)
    assert not torch.allclose(M.attention_entropy(two), M.attention_entropy(one))
    with pytest.raises(ValueError, match="cls token"):
        M.cls_jaccard(one[..., 1:, 1:], inst, 4, num_prefix=0)


# ------------------------------------------------------------------------------------------
# real tiny model on a scenes batch: every metric, shapes and ranges


def _scenes(n: int = 6):
    from rmae.data import RegionDataset, build_dataset, collate_regions

    base = build_dataset("scenes:val:64", image_size=IMG)
    ds = RegionDataset(base, source=None, cache=None, image_size=IMG, train=False, crop_pct=1.0)
    return base, collate_regions([ds[i] for i in range(n)])


def test_every_metric_on_real_model_and_scenes():
    base, batch = _scenes()
    images, inst = batch["images"], batch["instances"]
    model = tiny_model()
    grid, p = encoder.grid_size(model), encoder.patch_size(model)
    _, rec = encoder.attention_pass(model, images)
    attn = rec.weights
    B, depth, heads, L = 6, 2, model.blocks[0].attn.num_heads, grid[0] * grid[1]

    dist = M.mean_attention_distance(attn, grid, p)
    max_d = math.dist((p / 2, p / 2), (IMG - p / 2, IMG - p / 2))
    assert dist.shape == (B, depth, heads) and ((dist > 0) & (dist < max_d)).all()
    ent = M.attention_entropy(attn)
    assert ent.shape == (B, depth, heads) and ((ent >= 0) & (ent <= math.log(L) + 1e-9)).all()
    nmi = M.attention_nmi(attn)
    assert nmi.shape == (B, depth, heads) and ((nmi >= 0) & (nmi <= 1)).all()

    ia = M.instance_awareness(attn, inst, p, heads="each")
    assert ia.mass.shape == (B, depth, heads) and (ia.num_queries > 0).all()
    torch.testing.assert_close(ia.mass + ia.leak + ia.background, torch.ones_like(ia.mass))
    for v in (ia.mass, ia.leak, ia.background, ia.jaccard):
        assert ((v >= 0) & (v <= 1)).all()
    cj = M.cls_jaccard(attn[-1], inst, p)
    assert cj.shape == (B,) and ((cj >= 0) & (cj <= 1)).all()

    # ground-truth boxes from the cropped instance maps equal the dataset's own boxes (crop 1.0)
    gt = boxes_from_instances(inst)
    for i in range(B):
        raw = base.load(i)
        present = torch.as_tensor(sorted(set(raw["instances"].ravel().tolist()) - {0}))
        torch.testing.assert_close(gt[i], torch.as_tensor(raw["boxes"], dtype=torch.float64)[present - 1])
    found = M.discover_objects(model, images)
    assert found.boxes.shape == (B, 4) and found.masks.shape == (B, *grid)
    assert ((found.boxes >= 0) & (found.boxes <= IMG)).all()
    assert (found.boxes[:, 2:] > found.boxes[:, :2]).all()
    hits = M.corloc(found.boxes, gt)
    assert set(hits.tolist()) <= {0.0, 1.0}
    assert found.masks.reshape(B, -1).gather(1, found.seeds[:, None]).all()  # seed inside its component


def _all_metrics(model, images: torch.Tensor, inst: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric of this package for one model, computed the way an analysis does: through
    analysis.encoder, with the model's own grid, patch size and prefix count."""
    grid, p, P = encoder.grid_size(model), encoder.patch_size(model), encoder.num_prefix_tokens(model)
    _, rec = encoder.attention_pass(model, images)
    attn = rec.weights
    ia = M.instance_awareness(attn, inst, p, heads="each", num_prefix=P)
    found = M.discover_objects(model, images)
    return {"distance": M.mean_attention_distance(attn, grid, p, num_prefix=P),
            "entropy": M.attention_entropy(attn, num_prefix=P), "nmi": M.attention_nmi(attn, num_prefix=P),
            **ia.as_dict(), "cls_jaccard": M.cls_jaccard(attn, inst, p, num_prefix=P),
            "selectivity": M.instance_selectivity(attn, inst, p, num_prefix=P),
            "boxes": found.boxes, "eigenvectors": found.eigenvectors, "corloc": M.corloc(found.boxes, boxes_from_instances(inst))}


def test_same_metrics_for_our_model_and_its_timm_export(tmp_path):
    """Analysis results for a timm ViT and for our model with the same weights are equal."""
    ours = tiny_model()
    name, kwargs = rmae.export_timm(ours, tmp_path / "enc.safetensors")
    vit = timm.create_model(name, **kwargs).eval()
    vit.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=True)
    _, batch = _scenes()
    images, inst = batch["images"], batch["instances"]
    a, b = _all_metrics(ours, images, inst), _all_metrics(vit, images, inst)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, equal_nan=True, msg=key)
    batches = [images[:3], images[3:]]
    for tokens in ("patch", "cls", "mean"):
        cross = M.layer_cka(ours, vit, batches, tokens=tokens)
        torch.testing.assert_close(torch.diagonal(cross), torch.ones(2, dtype=torch.float64), msg=tokens)
        torch.testing.assert_close(cross, M.layer_cka(ours, ours, batches, tokens=tokens), msg=tokens)


def test_metrics_follow_the_data_device():
    """Run everything with the model and data on the CPU while new tensors default to the meta
    device: a tensor made without naming its device would land on meta and fail the run."""
    _, batch = _scenes(2)
    images, inst = batch["images"], batch["instances"]
    model, other = tiny_model(), tiny_model("mae_vit_tiny_patch8", seed=1)
    expected = _all_metrics(model, images, inst)
    torch.set_default_device("meta")
    try:
        got = _all_metrics(model, images, inst)
        cka = M.layer_cka(model, other, [images], tokens="mean")
    finally:
        torch.set_default_device(None)
    for key in expected:
        assert got[key].device.type == "cpu", key
        torch.testing.assert_close(got[key], expected[key], equal_nan=True, msg=key)
    assert cka.device.type == "cpu" and torch.isfinite(cka).all()
