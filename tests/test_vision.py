"""Image input matches the transformers reference (float32): processed patches and positions,
vision-tower features, and denoise logits after prompts with images."""

from __future__ import annotations

import io

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

import tiny
from dgemma_mlx.image_processing import load_image, process_image
from dgemma_mlx.multimodal import PromptImage, build_image_prompt, image_features, read_images

TOL = 1e-4


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: resampling then has real work to do.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], -1)
    pixels = np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    elif mode != "RGB":
        image = image.convert(mode)
    return image


def reference_processed(image: Image.Image, budget: int):
    out = Gemma4ImageProcessorPil(max_soft_tokens=budget)(image, return_tensors="np")
    return out["pixel_values"][0], out["image_position_ids"][0], int(out["num_soft_tokens_per_image"][0])


SIZES = [(224, 224), (100, 150), (480, 640), (1000, 333), (37, 500), (900, 20), (48, 48), (3000, 2000)]


@pytest.mark.parametrize("budget", [70, 280, 1120])
@pytest.mark.parametrize("size", SIZES)
def test_processed_patches_and_positions_equal_the_reference(size, budget):
    image = random_image(*size, seed=size[0])
    pixels, positions, n = reference_processed(image, budget)
    ours = process_image(image, budget)
    assert ours.num_soft_tokens == n
    assert np.array_equal(ours.position_ids, positions)
    assert ours.pixel_values.dtype == np.float32 and np.array_equal(ours.pixel_values, pixels)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_non_rgb_images_are_converted_as_the_reference_does(mode):
    image = random_image(120, 90, seed=3, mode=mode)
    pixels, positions, _ = reference_processed(image, 70)
    ours = process_image(image, 70)
    assert np.array_equal(ours.pixel_values, pixels) and np.array_equal(ours.position_ids, positions)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_image_files_are_read_as_transformers_load_image_reads_them(tmp_path, fmt):
    from transformers.image_utils import load_image as hf_load_image

    path = tmp_path / f"picture.{fmt.lower()}"
    random_image(130, 170, seed=5).save(path, format=fmt)
    ours = np.asarray(load_image(path))
    theirs = np.asarray(hf_load_image(str(path)).convert("RGB"))
    assert ours.shape == (130, 170, 3) and np.array_equal(ours, theirs)


def test_exif_orientation_turns_the_image_upright(tmp_path):
    image = random_image(60, 200, seed=6)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after a 90-degree clockwise turn
    path = tmp_path / "rotated.jpg"
    image.save(path, format="JPEG", exif=exif.tobytes())
    assert load_image(path).size == (60, 200)  # (width, height) after the turn


def reference_features(ref, images):
    with torch.no_grad():
        out = ref.model.encoder.get_image_features(
            torch.tensor(np.stack([p for p, _, _ in images])), torch.tensor(np.stack([q for _, q, _ in images]))
        )
    return out.pooler_output.numpy()


@pytest.mark.parametrize("size, budget", [((100, 150), 70), ((480, 640), 140), ((37, 500), 70), ((300, 300), 280)])
def test_vision_features_match_the_reference(reference_model, model, size, budget):
    image = random_image(*size, seed=budget)
    theirs = reference_features(reference_model, [reference_processed(image, budget)])
    ours = np.array(image_features(model, process_image(image, budget)))
    assert ours.shape == theirs.shape == (process_image(image, budget).num_soft_tokens, model.args.hidden_size)
    assert np.abs(ours - theirs).max() <= TOL


def prompt_with_images(model, tokenizer, text, images):
    return build_image_prompt(model, tokenizer, text, images)


def ref_encode_with_images(ref, blocks, processed):
    """The reference's encoder as its ``generate`` drives it: the prompt with pixel values and the
    vision-aware mask mapping, then each committed block."""
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    enc = ref.model.encoder
    with torch.no_grad():
        for i, block in enumerate(blocks):
            ids = torch.tensor(block)[None]
            L, past = ids.shape[1], cache.get_seq_length()
            kwargs = {}
            mm = (ids == tiny.IMAGE_ID).long()
            if i == 0 and processed:
                kwargs = dict(
                    pixel_values=torch.tensor(np.stack([p for p, _, _ in processed])),
                    image_position_ids=torch.tensor(np.stack([q for _, q, _ in processed])),
                    mm_token_type_ids=mm,
                )
            masks = enc.create_masks_for_generate(
                config=ref.config,
                inputs_embeds=torch.empty((1, L, 0)),
                attention_mask=torch.ones((1, past + L), dtype=torch.bool),
                cache=cache,
                position_ids=torch.arange(past, past + L)[None],
                mm_token_type_ids=mm,
            )
            enc(input_ids=ids, attention_mask=masks, cache=cache, position_ids=torch.arange(past, past + L)[None], **kwargs)
    return cache


def ref_denoise(ref, cache, canvas, sc):
    with torch.no_grad():
        out = ref(decoder_input_ids=torch.tensor(canvas)[None], cache=cache, self_conditioning_logits=torch.tensor(sc)[None])
    return out.logits[0].numpy()


def image_case(model, tokenizer, shapes, budget=70, chunk_size=None, committed=0, seed=0):
    """Logits (ours, reference inputs) for a chat prompt with images of ``shapes``."""
    rng = np.random.default_rng(seed)
    pil = [random_image(h, w, seed=seed + i) for i, (h, w) in enumerate(shapes)]
    processed = [process_image(im, budget) for im in pil]
    images = [PromptImage(image_features(model, p)) for p in processed]
    prompt = build_image_prompt(model, tokenizer, "the sky is blue", images)
    V, C = model.args.vocab_size, model.args.canvas_length
    blocks = [prompt] + [rng.integers(0, V, C).tolist() for _ in range(committed)]
    canvas = rng.integers(0, V, C).tolist()
    sc = (rng.normal(size=(C, V)) * 4).astype(np.float32)
    cache = model.make_cache()
    model.encode(mx.array(prompt)[None], cache, chunk_size=chunk_size,
                 image_features=mx.concatenate([im.features for im in images]))
    for b in blocks[1:]:
        model.encode(mx.array(b)[None], cache)
    ours = np.array(model.denoise(mx.array(canvas)[None], cache, mx.array(sc)[None])[0])
    ref_inputs = [(p.pixel_values, p.position_ids, p.num_soft_tokens) for p in processed]
    return ours, blocks, canvas, sc, ref_inputs


@pytest.mark.parametrize(
    "shapes, chunk_size, committed",
    [
        ([(100, 150)], None, 0),
        ([(100, 150)], 16, 1),  # chunks that would split the image are extended
        ([(100, 150), (300, 120)], None, 0),
        ([(100, 150), (300, 120)], 24, 2),
    ],
)
def test_denoise_logits_after_images_match_the_reference(reference_model, model, tokenizer, shapes, chunk_size, committed):
    ours, blocks, canvas, sc, ref_inputs = image_case(model, tokenizer, shapes, chunk_size=chunk_size, committed=committed)
    ids = np.array(blocks[0])
    assert (ids == tiny.IMAGE_ID).sum() == sum(n for _, _, n in ref_inputs)
    assert (ids == tiny.BOI_ID).sum() == (ids == tiny.EOI_ID).sum() == len(shapes)
    theirs = ref_denoise(reference_model, ref_encode_with_images(reference_model, blocks, ref_inputs), canvas, sc)
    diff = np.abs(ours - theirs).max()
    print(f"{len(shapes)} image(s), chunk {chunk_size}, {committed} committed: max |diff| {diff:.2e}")
    assert diff <= TOL


def test_images_attend_to_themselves_bidirectionally(reference_model, model, tokenizer):
    """The vision mask matters: a causal-only encode of the same prompt gives other logits."""
    ours, blocks, canvas, sc, ref_inputs = image_case(model, tokenizer, [(100, 150)])
    cache = DynamicCache(config=reference_model.config.get_text_config(decoder=True))
    with torch.no_grad():
        reference_model.model.encoder(
            input_ids=torch.tensor(blocks[0])[None],
            pixel_values=torch.tensor(ref_inputs[0][0])[None],
            image_position_ids=torch.tensor(ref_inputs[0][1])[None],
            cache=cache,
        )
    causal = ref_denoise(reference_model, cache, canvas, sc)
    assert np.abs(ours - causal).max() > 1e-2


def test_images_come_before_the_text_in_the_user_turn(model, tokenizer):
    images = [PromptImage(mx.zeros((3, model.args.hidden_size)))] * 2
    ids = build_image_prompt(model, tokenizer, "the sky is blue", images)
    text = tokenizer.decode(ids)
    assert text.index("<|image>") < text.index("the sky")
    assert text.count("<|image|>") == 6 and text.count("<|image>") == text.count("<image|>") == 2


def test_read_images_runs_the_tower_once_per_image_at_the_budget(tmp_path, model):
    paths = []
    for i, size in enumerate([(100, 150), (64, 64)]):
        paths.append(tmp_path / f"{i}.png")
        random_image(*size, seed=i).save(paths[-1])
    images = read_images(model, paths, max_soft_tokens=70)
    assert [im.num_tokens for im in images] == [process_image(load_image(p), 70).num_soft_tokens for p in paths]
    assert np.array_equal(np.array(images[0].features), np.array(image_features(model, process_image(load_image(paths[0]), 70))))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_towers_stay_close_to_float32(checkpoint, model, dtype):
    from dgemma_mlx import load

    half, _ = load(checkpoint, dtype=dtype)
    processed = process_image(random_image(100, 150), 70)
    a = np.array(image_features(model, processed))
    b = np.array(image_features(half, processed).astype(mx.float32))
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert np.isfinite(b).all() and cosine.min() > 0.999


def test_raw_prompts_put_the_images_first_after_any_bos(model, tokenizer):
    images = [PromptImage(mx.zeros((4, model.args.hidden_size)))]
    ids = build_image_prompt(model, tokenizer, "the sky", images, chat_template=False)
    text = list(tokenizer.encode("the sky"))
    head = text[:1] if text[0] == model.args.bos_token_id else []
    assert ids == head + [tiny.BOI_ID] + [tiny.IMAGE_ID] * 4 + [tiny.EOI_ID] + text[len(head):]


def test_a_chat_template_without_image_support_is_reported(tmp_path, model):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from dgemma_mlx import DGemmaError

    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] if m['content'] is string else '' }}{% endfor %}"
    tiny.write_tokenizer(tmp_path, chat_template=template)
    tok = load_tokenizer(tmp_path, eos_token_ids=tiny.EOS_IDS)
    with pytest.raises(DGemmaError, match="image placeholder"):
        build_image_prompt(model, tok, "the sky", [PromptImage(mx.zeros((4, model.args.hidden_size)))])
