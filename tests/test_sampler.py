"""The sampler against diffusers' StableDiffusionPipeline, batching invariance, bucketing, request checks."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sdray.errors import InputError
from sdray.models.components import load_components
from sdray.models.config import ModelConfig
from sdray.serve.config import ServeConfig
from sdray.serve.request import GenerationRequest, check_request
from sdray.serve.sampler import Sampler, make_scheduler, to_png

BASE = GenerationRequest(
    prompt="a large red circle in the top left",
    negative_prompt="blurry",
    seeds=(7,),
    width=32,
    height=32,
    steps=4,
    guidance_scale=7.5,
    scheduler="euler",
)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """Components loaded from a saved diffusers directory, and a sampler on them (1 torch thread)."""
    # On a shared 2-core machine two intra-op threads wait on each other's time slices (100x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    components = load_components(ModelConfig(path=str(tiny_model_dir)))
    yield components, Sampler(components, source=str(tiny_model_dir))
    torch.set_num_threads(threads)


def _pipeline_images(components, req: GenerationRequest, seed: int) -> np.ndarray:
    pipe = components.pipeline()
    pipe.scheduler = make_scheduler(req.scheduler, components.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        req.prompt,
        negative_prompt=req.negative_prompt,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        height=req.height,
        width=req.width,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


@pytest.mark.parametrize(
    ("scheduler", "guidance"),
    [("ddim", 7.5), ("euler", 7.5), ("euler_a", 5.0), ("dpmpp_2m", 7.5), ("pndm", 1.0)],
)
def test_sampler_equals_diffusers_pipeline(loaded, scheduler, guidance):
    components, sampler = loaded
    req = replace(BASE, scheduler=scheduler, guidance_scale=guidance, width=48)
    ours = sampler.sample([req], [7])
    ref = _pipeline_images(components, req, 7)
    assert ours.shape == ref.shape == (1, 32, 48, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    assert ours.std() > 0.01  # an actual image, not a constant


def test_batched_equals_single(loaded):
    scheduler = "euler_a"  # stochastic steps: each image must draw from its own generator
    _, sampler = loaded
    reqs = [
        replace(BASE, scheduler=scheduler, prompt=p, negative_prompt=neg, seeds=(s,))
        for p, neg, s in [("a cat", "", 1), ("a blue square on a red background", "dark", 2), ("x", "", 3)]
    ]
    batched = sampler.sample(reqs, [1, 2, 3])
    for i, req in enumerate(reqs):
        alone = sampler.sample([req], list(req.seeds))[0]
        np.testing.assert_allclose(batched[i], alone, atol=1e-5, rtol=0)
    assert np.abs(batched[0] - batched[1]).max() > 0.01  # different prompts/seeds -> different images


def test_generate_buckets_one_unet_call_per_step(loaded):
    _, sampler = loaded
    calls: list[int] = []
    hook = sampler.pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        same = [replace(BASE, seeds=(1, 2)), replace(BASE, prompt="a green square", seeds=(3,))]
        other = replace(BASE, steps=3, height=32, width=32, guidance_scale=3.0, seeds=(4,))
        out = sampler.generate([same[0], other, same[1]], max_batch=8)
    finally:
        hook.remove()
    # Bucket of 3 images (CFG doubles the UNet batch): 4 calls of 6; the other bucket: 3 calls of 2.
    assert sorted(calls) == sorted([6] * 4 + [2] * 3)
    assert [len(images) for images in out] == [2, 1, 1]
    assert out[1][0].shape == (32, 32, 3)
    np.testing.assert_allclose(out[2][0], sampler.sample([same[1]], [3])[0], atol=1e-5, rtol=0)


def test_generate_chunks_by_max_batch(loaded):
    _, sampler = loaded
    calls: list[int] = []
    hook = sampler.pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        sampler.generate([replace(BASE, steps=2, guidance_scale=1.0, seeds=(1, 2, 3))], max_batch=2)
    finally:
        hook.remove()
    assert calls == [2, 2, 1, 1]  # no guidance: one UNet row per image; chunks of 2 then 1


def test_same_seed_same_image_other_seed_differs(loaded):
    _, sampler = loaded
    a, b, c = (sampler.sample([BASE], [s])[0] for s in (11, 11, 12))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0.01


def test_png_roundtrip():
    image = np.linspace(0, 1, 64 * 48 * 3, dtype=np.float32).reshape(64, 48, 3)
    decoded = np.asarray(Image.open(io.BytesIO(to_png(image))))
    assert decoded.shape == (64, 48, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, (image * 255).round().astype(np.uint8))


def test_check_request_names_fields_and_token_count(loaded):
    _, sampler = loaded
    cfg = ServeConfig(max_steps=50, max_side=256, max_images=4)
    assert check_request(BASE, sampler.info, cfg, sampler.count_tokens) == []
    bad = replace(
        BASE,
        prompt="red " * 100,
        negative_prompt="   ",
        seeds=tuple(range(5)),
        steps=51,
        width=60,
        height=512,
        guidance_scale=-1.0,
        scheduler="plms",
    )
    errors = dict(check_request(bad, sampler.info, cfg, sampler.count_tokens))
    assert errors["prompt"] == "is 102 tokens; the text encoder takes at most 77"
    assert set(errors) == {"prompt", "n", "steps", "width", "height", "guidance_scale", "scheduler"}
    assert "multiple of 8" in errors["width"] and "got 512" in errors["height"]
    assert check_request(replace(BASE, prompt="  "), sampler.info, cfg, sampler.count_tokens) == [
        ("prompt", "must not be empty")
    ]


def test_unknown_scheduler_is_input_error(loaded):
    components, _ = loaded
    with pytest.raises(InputError, match="scheduler: unknown 'nope'; known: ddim, euler"):
        make_scheduler("nope", components.scheduler.config)
    assert (
        type(make_scheduler("dpmpp_2m", components.scheduler.config)).__name__
        == "DPMSolverMultistepScheduler"
    )


def test_initial_noise_is_drawn_on_the_cpu_in_float32(monkeypatch):
    # A seed must give the same noise whatever the model's device and dtype: diffusers' reproducibility
    # advice is to draw on the CPU (a CUDA generator draws another sequence). No GPU here, so the test
    # watches the draw itself, on a bfloat16 sampler standing in for a GPU one.
    sampler = Sampler(load_components(ModelConfig()), dtype="bfloat16")
    scheduler = make_scheduler("euler", sampler.pipe.scheduler.config)
    draws, randn = [], torch.randn

    def spy(*args, **kwargs):
        out = randn(*args, **kwargs)
        draws.append((out.device.type, out.dtype, kwargs["generator"].device.type))
        return out

    monkeypatch.setattr(torch, "randn", spy)
    got = sampler._initial_latents(BASE, torch.Generator("cpu").manual_seed(3), scheduler)
    monkeypatch.undo()
    assert draws == [("cpu", torch.float32, "cpu")]
    drawn = torch.randn((1, 4, 4, 4), generator=torch.Generator("cpu").manual_seed(3))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, drawn.to(torch.bfloat16) * scheduler.init_noise_sigma)


def test_scheduler_that_cannot_keep_the_model_schedule_is_refused(loaded):
    from diffusers import DDPMScheduler

    from sdray.serve.sampler import compatible_schedulers

    zero_snr = DDPMScheduler(
        rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"
    ).config
    assert compatible_schedulers(zero_snr) == ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")
    assert "pndm" in compatible_schedulers(loaded[0].scheduler.config)  # the tiny model's plain schedule
    with pytest.raises(
        InputError, match="'pndm' cannot keep this model's rescale_betas_zero_snr; use one of"
    ):
        make_scheduler("pndm", zero_snr)
    info = replace(loaded[1].info, schedulers=compatible_schedulers(zero_snr))
    errors = check_request(replace(BASE, scheduler="pndm"), info, ServeConfig(), lambda text: 3)
    assert [name for name, _ in errors] == ["scheduler"]
    assert "cannot keep this model's noise schedule" in errors[0][1] and "dpmpp_2m_karras" in errors[0][1]
