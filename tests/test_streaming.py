"""The streamed analysis pass: each layer's attention reduced to its metric values while the forward
pass runs (analysis.encoder.recording(reduce=…) + analysis.metrics.stream.ImageMetrics), in query
chunks, with one layer's weights alive at a time — equal to the one-metric functions on the
recorded layers."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from conftest import IMG, tiny_model, tiny_timm_vit

from analysis import encoder
from analysis import metrics as M
from analysis.analyze import attention_metrics
from analysis.groundtruth import boxes_from_instances, compact_ids
from analysis.metrics._layers import reduce_layer
from analysis.metrics.attention import NMI, Distance, Entropy
from analysis.metrics.instance import InstanceLayer, SelectivityLayer
from analysis.metrics.stream import ImageMetrics
from rmae.data import evaluation_loader


def _batch(n: int = 4):
    return next(iter(evaluation_loader("scenes:val:8", IMG, batch_size=n)))


def _reference(model, images: torch.Tensor, inst: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-image values rmae analyze reports, from the public one-metric functions on every
    recorded layer (float64), the way the analysis computed them before it streamed."""
    info = encoder.describe(model)
    P, p, grid = info.num_prefix_tokens, info.patch_size, info.grid
    _, rec = encoder.attention_pass(model, images, keys=True)
    attn = rec.weights
    ia = M.instance_awareness(attn, inst, p, num_prefix=P)
    found = M.tokencut(rec.keys[-1][:, P:], grid, p)
    return {"attention_distance": M.mean_attention_distance(attn, grid, p, num_prefix=P).mean(-1),
            "attention_entropy": M.attention_entropy(attn, num_prefix=P).mean(-1),
            "attention_nmi": M.attention_nmi(attn, num_prefix=P).mean(-1),
            "instance_mass": ia.mass, "instance_leak": ia.leak, "instance_jaccard": ia.jaccard,
            "instance_selectivity": M.instance_selectivity(attn, inst, p, num_prefix=P),
            "cls_jaccard": M.cls_jaccard(attn, inst, p, num_prefix=P),
            "corloc": M.corloc(found.boxes, boxes_from_instances(inst))}


@pytest.mark.parametrize("which", ["ours", "timm-registers"])
def test_streamed_metrics_equal_the_one_metric_functions(which):
    model = tiny_model() if which == "ours" else tiny_timm_vit(reg_tokens=2)
    batch = _batch()
    images, inst = batch["images"], batch["instances"]
    expected = _reference(model, images, inst)
    info = encoder.describe(model)
    for dtype, tol in ((torch.float64, dict(rtol=1e-12, atol=1e-12)), (torch.float32, dict(rtol=1e-5, atol=1e-6))):
        reducer = ImageMetrics(info, inst, dtype=dtype)
        _, rec = encoder.attention_pass(model, images, keys=[-1], reduce=reducer, keep=[-1])
        got = reducer.finish(rec.keys[-1])
        assert list(got) == list(expected)  # every metric, in the report's order
        for key in expected:
            assert got[key].dtype == torch.float64 and got[key].shape == expected[key].shape, key
            torch.testing.assert_close(got[key], expected[key], equal_nan=True, msg=f"{key} ({dtype})", **tol)
        assert rec.layers == [info.depth - 1] and len(rec.weights) == 1 and len(rec.keys) == 1


def test_query_chunks_do_not_change_the_values():
    """One query per chunk (the smallest budget) gives the values of one chunk per layer."""
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(3, 2, 1 + 16, 1 + 16, dtype=torch.float64) * 3, -1)
    inst = _batch(3)["instances"][:, :16, :16]
    metrics = [Distance((4, 4), 4), Entropy(), NMI(), InstanceLayer(inst, 4, heads="each"), SelectivityLayer(inst, 4)]
    whole = reduce_layer(a, 1, metrics, 16)
    chunked = reduce_layer(a, 1, metrics, 16, max_elements=1)
    for x, y in zip(whole, chunked):
        torch.testing.assert_close(x, y, equal_nan=True, rtol=1e-12, atol=1e-12)


def test_head_mean_distance_is_the_mean_of_the_head_distances():
    torch.manual_seed(1)
    a = torch.softmax(torch.randn(2, 3, 13, 13, dtype=torch.float64), -1)
    each, = reduce_layer(a, 1, [Distance((3, 4), 8)], 12)
    mean, = reduce_layer(a, 1, [Distance((3, 4), 8, heads="mean")], 12)
    torch.testing.assert_close(mean[:, 0], each.mean(-1))


def test_one_layer_of_weights_is_alive_at_a_time():
    """However deep the model, when layer i is reduced no earlier layer's weights are alive
    (counted with weak references, not seconds or bytes); only the kept layer survives."""
    model = tiny_model(depth=6)
    refs: list[weakref.ref] = []
    alive_at: list[int] = []

    def reduce(layer: int, w: torch.Tensor) -> None:
        gc.collect()
        alive_at.append(sum(r() is not None for r in refs))
        refs.append(weakref.ref(w))

    _, rec = encoder.attention_pass(model, torch.randn(2, 3, IMG, IMG), reduce=reduce, keep=[2])
    assert alive_at == [0, 0, 0, 1, 1, 1]  # from layer 3 on, only the kept layer 2 is alive
    gc.collect()
    assert [r() is not None for r in refs] == [False, False, True, False, False, False]
    assert rec.layers == [2] and rec.weights[0] is refs[2]()
    # without reduce every layer is kept, as before
    _, full = encoder.attention_pass(model, torch.randn(2, 3, IMG, IMG))
    assert full.layers == list(range(6)) and len(full.weights) == 6 and full.keys == []


def test_reduce_sees_the_recorded_weights_in_layer_order():
    model = tiny_timm_vit(reg_tokens=1)
    x = torch.randn(2, 3, IMG, IMG)
    seen = []
    _, rec = encoder.attention_pass(model, x, layers=[1, 0], keys=[0], reduce=lambda i, w: seen.append((i, w.clone())))
    _, full = encoder.attention_pass(model, x)
    assert [i for i, _ in seen] == [0, 1]
    for i, w in seen:
        torch.testing.assert_close(w, full.weights[i])
    assert rec.weights == [] and len(rec.keys) == 1 and rec.keys[0].shape == (2, 2 + 16, 48)


def test_attention_metrics_keep_the_last_layer_for_the_overlays():
    model = tiny_model()
    loader = evaluation_loader("scenes:val:6", IMG, batch_size=3)
    seen = []
    vals = attention_metrics({"m": model}, loader, on_batch=lambda name, info, images, inst, rec: seen.append(rec))
    assert [len(r.weights) for r in seen] == [1, 1] and all(r.layers == [1] for r in seen)
    assert vals["m"]["attention_distance"].shape == (6, 2) and vals["m"]["corloc"].shape == (6,)
    batch = next(iter(loader))
    ref = _reference(model, batch["images"], batch["instances"])
    for key, value in ref.items():
        np.testing.assert_allclose(vals["m"][key][:3], value.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_bf16_pass_hands_float32_weights_on():
    """precision="bf16" (autocast) where exact weights are not needed: the reducer still gets
    float32 rows summing to 1, and the metrics stay near the float32 pass's."""
    model = tiny_model()
    loader = evaluation_loader("scenes:val:4", IMG, batch_size=4)
    dtypes = []
    batch = next(iter(loader))
    encoder.attention_pass(model, batch["images"], precision="bf16", reduce=lambda i, w: dtypes.append(w.dtype))
    assert dtypes == [torch.float32, torch.float32]
    exact, fast = attention_metrics({"m": model}, loader), attention_metrics({"m": model}, loader, precision="bf16")
    for key in ("attention_distance", "attention_entropy", "instance_mass"):
        np.testing.assert_allclose(fast["m"][key], exact["m"][key], rtol=0.05, err_msg=key)


def test_compact_ids_is_unique_with_inverse():
    g = torch.Generator().manual_seed(0)
    for ids in (torch.randint(0, 9, (2, 8, 8), generator=g), torch.tensor([[5, 5], [100_000, 7]]),
                torch.randint(0, 900_000, (3, 4), generator=g), torch.zeros(0, dtype=torch.long)):
        a, b = compact_ids(ids), torch.unique(ids, sorted=True, return_inverse=True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
