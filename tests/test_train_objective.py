"""The block-diffusion training loss equals the torch references (TRL's batched formula where
sequences fit the sliding window, a per-example inference-shaped reference where they do not),
and its gradients equal torch autograd's."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import tiny
import train_reference as R
from dgemma_mlx import load
from dgemma_mlx.train.objective import block_diffusion_loss, canvas_targets, num_blocks, sample_draws

EOS = 1
C = tiny.TinySpec().canvas_length


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """``(torch_model, mlx_model)`` whose sliding window (64) holds every test sequence."""
    ref, path = tiny.build_reference(tmp_path_factory.mktemp("wide") / "ckpt", spec=tiny.TinySpec(sliding_window=64))
    return ref, load(path)[0]


def ours(model, ids, am, rm, block, canvas, sc, **kw):
    out = block_diffusion_loss(
        model, mx.array(ids, dtype=mx.int32), mx.array(am), mx.array(rm), mx.array(block, dtype=mx.int32),
        mx.array(canvas, dtype=mx.int32), mx.array(sc), eos_id=EOS, **kw,
    )
    return [float(x) for x in out]


def case(seed, lengths, prompts, block, sc):
    rng = np.random.default_rng(seed)
    ids, am, rm = R.batch(rng, lengths, prompts, tiny.VOCAB_SIZE)
    canvas = rng.integers(0, tiny.VOCAB_SIZE, (len(lengths), C))
    return ids, am, rm, np.array(block), canvas, np.array(sc)


# Right-padded batches of unequal lengths; block 0, 1 and >= 2; self-conditioning on, off, mixed.
FITTING = {
    "mixed-sc": (0, [60, 45, 30], [5, 3, 9], [2, 0, 1], [True, False, True]),
    "no-sc": (1, [60, 45, 30], [5, 3, 9], [3, 2, 0], [False, False, False]),
    "all-sc": (2, [57, 22, 40], [20, 4, 7], [2, 1, 0], [True, True, True]),
}
LONG = {  # prompts longer than the sliding window (8)
    "mixed-sc": (3, [50, 37, 22], [12, 3, 9], [2, 1, 0], [True, False, True]),
    "no-sc": (4, [50, 37, 22], [12, 3, 9], [0, 2, 0], [False, False, False]),
    "all-sc": (5, [64, 41, 30], [30, 11, 17], [2, 1, 0], [True, True, True]),
}


@pytest.mark.parametrize("name", FITTING)
def test_loss_equals_trl_batched_formula_when_sequences_fit_the_window(wide, name):
    ref, model = wide
    c = case(*FITTING[name])
    with torch.no_grad():
        expected = [float(x) for x in R.trl_loss(ref, *c, eos=EOS)]
    np.testing.assert_allclose(ours(model, *c), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", LONG)
def test_loss_follows_inference_for_prompts_longer_than_the_window(reference_model, model, name):
    c = case(*LONG[name])
    with torch.no_grad():
        expected = [float(x) for x in R.inference_loss(reference_model, *c, eos=EOS)]
    np.testing.assert_allclose(ours(model, *c), expected, atol=1e-4, rtol=0)


def test_encoder_weight_scales_only_the_encoder_part(model):
    c = case(*LONG["mixed-sc"])
    full = ours(model, *c)
    half = ours(model, *c, encoder_weight=0.5)
    none = ours(model, *c, encoder_weight=0.0)
    assert half[1] == pytest.approx(full[1], abs=1e-6)
    assert half[0] == pytest.approx(full[1] + 0.5 * full[2], abs=1e-5)
    assert none[0] == pytest.approx(full[1], abs=1e-5) and none[2] == 0.0


# (ours, reference) names of a sample of parameters: attention, dense MLP, embedding (tied head),
# self-conditioning, router and experts.
GRADIENT_SAMPLE = [
    ("layers.0.self_attn.q_proj.weight", "model.encoder.language_model.layers.0.self_attn.q_proj.weight"),
    ("layers.5.self_attn.k_proj.weight", "model.encoder.language_model.layers.5.self_attn.k_proj.weight"),
    ("layers.5.mlp.down_proj.weight", "model.encoder.language_model.layers.5.mlp.down_proj.weight"),
    ("embed_tokens.weight", "model.encoder.language_model.embed_tokens.weight"),
    ("self_conditioning.up_proj.weight", "model.decoder.self_conditioning.up_proj.weight"),
    ("layers.2.router.proj.weight", "model.encoder.language_model.layers.2.router.proj.weight"),
    ("layers.3.experts.down_proj.weight", "model.encoder.language_model.layers.3.experts.down_proj"),
]


def assert_gradients_match(model, ref, ids, am, rm, block, canvas, sc):
    """Our loss's gradients on the batch against the torch reference's (``ref``: backward already run)."""
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    def loss(params):
        model.update(params)
        return block_diffusion_loss(
            model, mx.array(ids, dtype=mx.int32), mx.array(am), mx.array(rm), mx.array(block, dtype=mx.int32),
            mx.array(canvas, dtype=mx.int32), mx.array(sc), eos_id=EOS,
        )[0]

    params = model.trainable_parameters()
    grads = dict(tree_flatten(mx.grad(loss)(params)))
    model.update(params)
    ref.zero_grad(set_to_none=True)
    for name, ref_name in GRADIENT_SAMPLE:
        a, b = np.array(grads[name]), ref_grads[ref_name].numpy()
        assert a.shape == b.shape, name
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel < 1e-4, f"{name}: relative gradient error {rel:.2e}"


def test_gradients_match_torch_autograd(reference_model, model):
    ids, am, rm, block, canvas, sc = case(*LONG["mixed-sc"])
    ref = reference_model
    ref.zero_grad(set_to_none=True)
    R.inference_loss(ref, ids, am, rm, block, canvas, sc, eos=EOS)[0].backward()
    assert_gradients_match(model, ref, ids, am, rm, block, canvas, sc)


def test_clean_canvas_is_the_block_then_eos_fill():
    ids = mx.array([[2, 10, 11, 12, 13, 14, 0, 0]])
    rm = mx.array([[0, 0, 1, 1, 1, 1, 0, 0]])
    targets, cut = canvas_targets(ids, rm, mx.array([1]), 3, eos_id=EOS)
    assert targets.tolist() == [[14, EOS, EOS]] and cut.tolist() == [5]
    assert num_blocks(rm, 3).tolist() == [2] and num_blocks(rm, 4).tolist() == [1]


def test_sampled_draws_stay_in_range_and_corrupt_at_rate_t():
    rng = np.random.default_rng(0)
    ids, am, rm = R.batch(rng, [70, 20] * 64, [4, 2] * 64, tiny.VOCAB_SIZE)
    ids, rm = mx.array(ids, dtype=mx.int32), mx.array(rm)
    d = sample_draws(mx.random.key(0), ids, rm, canvas_length=C, vocab_size=tiny.VOCAB_SIZE, eos_id=EOS,
                     t_range=(0.5, 0.5), self_conditioning_p=0.5)
    blocks = np.array(d.block_index)
    assert set(blocks[0::2]) == {0, 1, 2, 3, 4} and set(blocks[1::2]) == {0, 1}
    changed = (np.array(d.canvas_ids) != np.array(d.targets)).mean()
    assert 0.45 < changed < 0.52  # t = 0.5, minus the few noise draws equal to the target
    assert 0.35 < np.array(d.self_conditioning_mask).mean() < 0.65
    expected, _ = canvas_targets(ids, rm, d.block_index, C, EOS)
    assert np.array_equal(np.array(d.targets), np.array(expected))


# Two blocks per example, example-major: canvas rows 2k and 2k + 1 belong to example k.
SECOND = ([0, 2, 0], [False, True, False])


def two_blocks_per_example():
    ids, am, rm, block, canvas, sc = case(*LONG["mixed-sc"])
    block2, sc2 = np.array(SECOND[0]), np.array(SECOND[1])
    canvas2 = np.random.default_rng(9).integers(0, tiny.VOCAB_SIZE, canvas.shape)
    both = lambda a, b: np.stack([a, b], axis=1).reshape(-1, *a.shape[1:])  # noqa: E731
    single = [(ids, am, rm, block, canvas, sc), (ids, am, rm, block2, canvas2, sc2)]
    return (ids, am, rm, both(block, block2), both(canvas, canvas2), both(sc, sc2)), single


def test_k_blocks_per_example_score_the_mean_of_the_reference_single_block_losses(reference_model, model):
    joint, single = two_blocks_per_example()
    with torch.no_grad():
        refs = [[float(x) for x in R.inference_loss(reference_model, *c, eos=EOS)] for c in single]
    diffusion, encoder = np.mean([r[1] for r in refs]), refs[0][2]
    np.testing.assert_allclose(ours(model, *joint), [diffusion + encoder, diffusion, encoder], atol=1e-4, rtol=0)


def test_k_blocks_per_example_gradients_are_the_mean_of_the_reference_single_block_gradients(reference_model, model):
    (ids, am, rm, block, canvas, sc), single = two_blocks_per_example()
    ref = reference_model
    ref.zero_grad(set_to_none=True)
    losses = [R.inference_loss(ref, *c, eos=EOS) for c in single]
    # The encoder's loss counts once: it is the same for both blocks.
    ((losses[0][1] + losses[1][1]) / 2 + losses[0][2]).backward()
    assert_gradients_match(model, ref, ids, am, rm, block, canvas, sc)


def test_draws_for_k_blocks_per_example_are_example_major_and_k1_is_the_reference_draw():
    rng = np.random.default_rng(1)
    ids, am, rm = R.batch(rng, [70, 20, 45], [4, 2, 9], tiny.VOCAB_SIZE)
    ids, rm = mx.array(ids, dtype=mx.int32), mx.array(rm)
    kw = dict(canvas_length=C, vocab_size=tiny.VOCAB_SIZE, eos_id=EOS)
    d = sample_draws(mx.random.key(3), ids, rm, blocks_per_example=4, **kw)
    assert d.block_index.shape == (12,) and d.canvas_ids.shape == (12, C) and d.self_conditioning_mask.shape == (12,)
    expected, _ = canvas_targets(mx.repeat(ids, 4, axis=0), mx.repeat(rm, 4, axis=0), d.block_index, C, EOS)
    assert np.array_equal(np.array(d.targets), np.array(expected))
    assert set(np.array(d.block_index)[4:8]) <= {0, 1}  # the 20-token row has two blocks
    assert len({tuple(r) for r in np.array(d.canvas_ids)[:4]}) == 4  # independent corruption per block
    one, default = sample_draws(mx.random.key(3), ids, rm, blocks_per_example=1, **kw), sample_draws(mx.random.key(3), ids, rm, **kw)
    for a, b in zip((one.block_index, one.canvas_ids, one.self_conditioning_mask), (default.block_index, default.canvas_ids, default.self_conditioning_mask)):
        assert np.array_equal(np.array(a), np.array(b))


def test_ordered_corruption_leaves_a_clean_prefix_of_random_length_and_noises_from_the_cut():
    rng = np.random.default_rng(2)
    ids, am, rm = R.batch(rng, [70] * 64, [4] * 64, tiny.VOCAB_SIZE)
    ids, rm = mx.array(ids, dtype=mx.int32), mx.array(rm)
    kw = dict(canvas_length=C, vocab_size=tiny.VOCAB_SIZE, eos_id=EOS, t_range=(1.0, 1.0))
    d = sample_draws(mx.random.key(5), ids, rm, ordered_p=1.0, **kw)
    changed = np.array(d.canvas_ids) != np.array(d.targets)
    cuts = changed.argmax(axis=1)
    after = np.arange(C)[None] >= cuts[:, None]
    assert changed.any(axis=1).all()
    assert changed[after].mean() > 0.95  # t = 1: everything from the cut on is noise (bar chance hits)
    assert len(set(cuts.tolist())) > 10 and cuts.max() > C // 2  # the cut is drawn, not fixed
    iid = np.array(sample_draws(mx.random.key(5), ids, rm, **kw).canvas_ids) != np.array(d.targets)
    assert iid.mean() > 0.95  # the same t without ordering corrupts the whole canvas


def test_ordered_corruption_of_zero_is_the_reference_draw():
    rng = np.random.default_rng(1)
    ids, am, rm = R.batch(rng, [70, 20, 45], [4, 2, 9], tiny.VOCAB_SIZE)
    ids, rm = mx.array(ids, dtype=mx.int32), mx.array(rm)
    kw = dict(canvas_length=C, vocab_size=tiny.VOCAB_SIZE, eos_id=EOS)
    zero, default = sample_draws(mx.random.key(3), ids, rm, ordered_p=0.0, **kw), sample_draws(mx.random.key(3), ids, rm, **kw)
    assert np.array_equal(np.array(zero.canvas_ids), np.array(default.canvas_ids))
    half = sample_draws(mx.random.key(3), ids, rm, ordered_p=0.5, **kw)
    assert np.array_equal(np.array(half.targets), np.array(default.targets))
