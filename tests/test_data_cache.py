"""The latent and text-embedding caches on the tiny sd1x: the second pass runs neither the VAE
nor the text encoder; a changed image is encoded again; another model misses."""

import os

import pytest
import torch
from PIL import Image

from slider_cn.config import load_config
from slider_cn.data.backends import build_backends
from slider_cn.data.cache import EncodedCache
from slider_cn.data.loading import load_batch
from slider_cn.data.sampler import SliderSampler
from slider_cn.families import get_family

# Building the tiny model dominates (about 10 s on a shared CPU).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from slider_cn.demo_data import write_demo_dataset

    paths = write_demo_dataset(tmp_path_factory.mktemp("demo"), images_per_group=2, resolution=64)
    config = load_config(paths["config"])
    family = get_family(config)
    return config, family, family.load_components()


class Counting:
    """Counts the family's encoder calls and the images / prompts that went through them."""

    def __init__(self, family, monkeypatch):
        self.vae_calls = self.vae_images = self.text_calls = self.text_prompts = 0
        encode_images, encode_prompts = family.encode_images, family.encode_prompts

        def images(components, pixels):
            self.vae_calls += 1
            self.vae_images += pixels.shape[0]
            return encode_images(components, pixels)

        def prompts(components, captions):
            self.text_calls += 1
            self.text_prompts += len(captions)
            return encode_prompts(components, captions)

        monkeypatch.setattr(family, "encode_images", images)
        monkeypatch.setattr(family, "encode_prompts", prompts)


def run_epoch(sampler, cache, epoch, pixels):
    sampler.set_epoch(epoch)
    out = {}
    for plan in sampler:
        batch = load_batch(plan, pixels=pixels)
        latents = cache.latents(batch)
        text = cache.text(batch.captions)
        assert latents.shape == (len(plan.samples), 4, 8, 8)
        assert text["encoder_hidden_states"].shape == (len(plan.samples), 77, 32)
        for sample, latent, hidden in zip(
            plan.samples, latents, text["encoder_hidden_states"], strict=True
        ):
            out[sample.path] = (latent, hidden)
    return out


def test_second_pass_hits_the_cache(tiny, tmp_path, monkeypatch):
    config, family, components = tiny
    calls = Counting(family, monkeypatch)
    backends = build_backends(config)
    sampler = SliderSampler(backends, 2, seed=0)
    cache = EncodedCache(tmp_path / "cache", family, components)
    captions = {sample.caption for backend in backends for sample in backend.samples}

    first = run_epoch(sampler, cache, 0, pixels=True)
    assert len(first) == 6
    assert calls.vae_calls == 3 and calls.vae_images == 6  # one VAE call per batch
    assert calls.text_prompts == len(captions)  # each distinct caption encoded once
    assert len(list((tmp_path / "cache/latents").glob("*.safetensors"))) == 6
    after_first = (calls.vae_calls, calls.text_calls)

    # The second epoch, and a second run (a new cache object), encode nothing.
    second = run_epoch(sampler, cache, 1, pixels=True)
    rerun = run_epoch(
        sampler, EncodedCache(tmp_path / "cache", family, components), 2, pixels=False
    )
    assert (calls.vae_calls, calls.text_calls) == after_first
    for path, (latent, hidden) in first.items():
        for again in (second, rerun):
            assert torch.equal(again[path][0], latent) and torch.equal(again[path][1], hidden)

    # The cached latent is the VAE's: encoding the batch again gives the same tensors.
    plan = sampler.plan_at(0, 0)
    with torch.no_grad():
        fresh = family.encode_images(components, load_batch(plan).pixels)
    for sample, latent in zip(plan.samples, fresh, strict=True):
        assert torch.allclose(latent, first[sample.path][0], atol=1e-5)


def test_changed_image_is_encoded_again(tiny, tmp_path, monkeypatch):
    config, family, components = tiny
    calls = Counting(family, monkeypatch)
    sampler = SliderSampler(build_backends(config), 1, seed=0)
    cache = EncodedCache(tmp_path / "cache", family, components)
    before = run_epoch(sampler, cache, 0, pixels=False)
    assert calls.vae_images == 6

    changed = sorted(before)[0]
    Image.new("RGB", (64, 64), (255, 255, 255)).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse mtime clocks
    after = run_epoch(sampler, cache, 1, pixels=False)
    assert calls.vae_images == 7 and calls.vae_calls == 7  # only the changed image
    assert not torch.equal(after[changed][0], before[changed][0])
    assert all(torch.equal(after[p][0], before[p][0]) for p in before if p != changed)


def test_other_model_or_resolution_misses(tiny, tmp_path, monkeypatch):
    config, family, components = tiny
    calls = Counting(family, monkeypatch)
    (plan, *_) = SliderSampler(build_backends(config), 2, seed=0)
    cache = EncodedCache(tmp_path / "cache", family, components)
    cache.latents(plan)
    cache.text(plan.captions)
    assert (calls.vae_calls, calls.text_calls) == (1, 1)

    other_seed = get_family(config.model_copy(update={"seed": config.seed + 1}))
    assert other_seed.encoder_identity() != family.encoder_identity()
    monkeypatch.setattr(other_seed, "encode_images", family.encode_images)
    monkeypatch.setattr(other_seed, "encode_prompts", family.encode_prompts)
    other = EncodedCache(tmp_path / "cache", other_seed, components)
    other.latents(plan)
    other.text(plan.captions)
    assert (calls.vae_calls, calls.text_calls) == (2, 2)

    bigger = plan.__class__(**{**plan.__dict__, "resolution": 128})
    assert cache.latents(bigger).shape[-1] == 16
    assert calls.vae_calls == 3


def test_unreadable_cache_entry_is_encoded_again(tiny, tmp_path, monkeypatch):
    config, family, components = tiny
    calls = Counting(family, monkeypatch)
    (plan, *_) = SliderSampler(build_backends(config), 1, seed=0)
    cache = EncodedCache(tmp_path / "cache", family, components)
    expected = cache.latents(plan)
    (entry,) = (tmp_path / "cache/latents").glob("*.safetensors")
    entry.write_bytes(b"garbage")
    assert torch.equal(cache.latents(plan), expected)
    assert calls.vae_calls == 2


def test_an_fp16_vae_that_asks_for_upcasting_encodes_in_fp32(tiny, tmp_path, monkeypatch):
    """SDXL's VAE overflows in fp16 (its config says force_upcast): under fp16 training it is
    upcast for each encode and put back, and the cache keys the dtype it encoded in."""
    import copy

    config, family, components = tiny
    components = copy.deepcopy(components)
    vae = components.vae.to(torch.float16)
    seen: list[torch.dtype] = []
    encode_images = family.encode_images

    def spy(components, pixels):
        seen.append(components.vae.dtype)
        return encode_images(components, pixels)

    monkeypatch.setattr(family, "encode_images", spy)
    backends = build_backends(config)
    plan = SliderSampler(backends, 1, 0).plan_at(0, 0)
    cache = EncodedCache(tmp_path / "upcast", family, components, device="cpu")
    latents = cache.latents(load_batch(plan))
    assert seen == [torch.float32] and vae.dtype == torch.float16
    assert torch.isfinite(latents).all()
    upcast_key = cache.latent_key(plan.samples[0].path, plan.resolution)
    vae.register_to_config(force_upcast=False)  # a fixed fp16 VAE encodes in fp16: other key
    assert cache.latent_key(plan.samples[0].path, plan.resolution) != upcast_key
    vae.register_to_config(force_upcast=True)
