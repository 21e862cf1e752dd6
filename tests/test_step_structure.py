"""What one distillation step asks of the host, counted on CPU: no reads of device values (each one stops the
host until the GPU catches up), on ordinary and reset iterations alike; resets restore the model on its device
in place; the online model's gradients are gone before the synthetic pass; checkpoints at a reset boundary
leave out the online model the next iteration resets."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from covmatch.distill import DistillConfig, Distiller
from covmatch.presets import get_preset

from .fixtures import BF16_TINY_IMAGE_SIZE

# the aten ops that copy a device value to the host (what .item(), bool(), .tolist() and friends run)
VALUE_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose"}


class ValueReads(TorchDispatchMode):
    """Counts value reads, by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in VALUE_READS:
            self.reads.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _distiller(**overrides) -> Distiller:
    preset_fields = {k: overrides.pop(k) for k in list(overrides) if k in get_preset("tiny").to_dict()}
    preset = get_preset("tiny", online="real", reset_every=3, iterations=6, **preset_fields)
    return Distiller(DistillConfig(preset=preset, device="cpu", progress=False, **overrides), log=lambda _m: None)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"precision": "bf16", "image_size": BF16_TINY_IMAGE_SIZE},
        {"precision": "fp16"},  # loss scaling: the fused SGD skips an overflowed step on the device
        {"syn_chunk": 3, "num_pairs": 12},
        {"normalize_loss": True, "frozen_text": True, "text_features": True},
    ],  # fmt: skip
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_a_step_reads_no_device_value(overrides):
    d = _distiller(**overrides)
    batches = list(zip(d.real_batches(0, 6), d.online_batches(0, 6)))  # resets at iterations 0 and 3
    with ValueReads() as counter:
        for real, online in batches:
            d.step(real, online)
    assert counter.reads == [], counter.reads


def test_sgd_is_fused_and_skips_an_overflowed_first_step_without_reading_a_device_value():
    """precision.sgd on the CPU: one fused kernel, momentum buffers from zero, so that a first step skipped for
    an fp16 overflow leaves nothing uninitialised and the next step is SGD's first step from none."""
    from covmatch.distill.distributed import Ranks
    from covmatch.distill.precision import ScaledStep, sgd

    cpu = torch.device("cpu")
    param, reference = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    optimizer = sgd([{"params": [param]}], cpu, lr=0.1, momentum=0.5)
    assert optimizer.defaults["fused"] and not optimizer.state  # nothing held before a step
    step = ScaledStep(optimizer, cpu, enabled=True, ranks=Ranks())
    gradient = torch.tensor([1.0, -2.0, 3.0, 0.5])
    with ValueReads() as counter:
        step.loss_scale()  # as before a backward
        param.grad = torch.full((4,), float("inf"))
        skipped = [step()]
        after_skip = param.detach().clone()
        param.grad = gradient * step.loss_scale()
        skipped.append(step())
    assert counter.reads == []
    assert [float(s) for s in skipped] == [1.0, 0.0] and torch.equal(after_skip, reference.detach())
    assert torch.isfinite(optimizer.state[param]["momentum_buffer"]).all()
    reference.grad = gradient
    torch.optim.SGD([reference], lr=0.1, momentum=0.5).step()
    torch.testing.assert_close(param.detach(), reference.detach(), rtol=0, atol=0)


def test_the_synthetic_pass_runs_without_the_online_models_gradients(monkeypatch):
    """The online model's gradients are freed once its step is taken: the synthetic pass, usually the
    iteration's largest graph, does not hold them in memory."""
    d = _distiller()
    params = [p for g in d.online.optimizer.param_groups for p in g["params"]]
    held: list = []
    synthetic_backward = d.synthetic.backward

    def checked(*args, **kwargs):
        held.append(sum(p.grad is not None for p in params))
        return synthetic_backward(*args, **kwargs)

    monkeypatch.setattr(d.synthetic, "backward", checked)
    for real, online in zip(d.real_batches(0, 2), d.online_batches(0, 2)):
        d.step(real, online)
    assert held == [0, 0] and any(s.get("momentum_buffer") is not None for s in d.online.optimizer.state.values())


def test_a_reset_restores_the_model_in_place_and_zeroes_momentum_without_a_new_optimizer():
    d = _distiller()
    batches = list(zip(d.real_batches(0, 4), d.online_batches(0, 4)))
    pretrained = {k: v.clone() for k, v in d.model.pretrained_state().items()}
    optimizer, params = d.online.optimizer, [p for g in d.online.optimizer.param_groups for p in g["params"]]
    for real, online in batches[:3]:
        d.step(real, online)
    assert any(s.get("momentum_buffer") is not None for s in optimizer.state.values())
    live = d.model.state_dict()
    assert any(not torch.equal(live[k], v) for k, v in pretrained.items())  # the online model has trained
    d.online.reset(torch.Generator().manual_seed(5))
    live = d.model.state_dict()
    assert all(torch.equal(live[k], v) for k, v in pretrained.items())
    assert d.online.optimizer is optimizer and [p for g in optimizer.param_groups for p in g["params"]] == params
    buffers = [s["momentum_buffer"] for s in optimizer.state.values() if s.get("momentum_buffer") is not None]
    assert buffers and all(not b.any() for b in buffers)


def test_a_checkpoint_at_a_reset_boundary_leaves_out_the_online_model_and_resumes_bit_exactly(tmp_path):
    from covmatch.distill.cli import main as distill_main

    common = ["--preset", "tiny", "--device", "cpu", "--no-progress", "--online", "real", "--reset-every", "3",
              "--iterations", "6", "--keep-checkpoints", "10"]  # fmt: skip
    assert distill_main([*common, "--out", str(tmp_path / "whole"), "--save-every", "2"]) == 0
    boundary, inside = (torch.load(tmp_path / "whole" / "checkpoints" / f"step_{t:08d}.pt", weights_only=True)
                        for t in (6, 4))  # fmt: skip
    assert boundary["state"].get("online_omitted") and "model" not in boundary["state"]
    assert "model" in inside["state"] and "online_omitted" not in inside["state"]
    sizes = {t: (tmp_path / "whole" / "checkpoints" / f"step_{t:08d}.pt").stat().st_size for t in (4, 6)}
    assert sizes[6] < sizes[4] / 2
    assert distill_main([*common, "--out", str(tmp_path / "part"), "--save-every", "3", "--iterations", "3"]) == 0
    assert torch.load(tmp_path / "part" / "checkpoints" / "step_00000003.pt", weights_only=True)["state"].get(
        "online_omitted"
    )
    assert distill_main([*common, "--out", str(tmp_path / "part"), "--save-every", "3", "--resume"]) == 0
    whole, part = ((tmp_path / d / "synthetic.safetensors").read_bytes() for d in ("whole", "part"))
    assert whole == part


def test_the_fp16_loss_scale_carries_over_resets_and_boundary_checkpoints(tmp_path):
    """fp16 (plain PyTorch on the CPU): the online model's loss scale is not set back at a reset, a checkpoint
    at a reset boundary keeps it, and a run resumed from there distils the uninterrupted run's set."""
    from covmatch.distill import distill

    def config(out: str, **overrides) -> DistillConfig:
        preset = get_preset("tiny", online="real", reset_every=3, iterations=overrides.pop("iterations", 6))
        return DistillConfig(preset=preset, device="cpu", precision="fp16", progress=False, out=str(tmp_path / out),
                             save_every=3, keep_checkpoints=10, log_every=1, **overrides)  # fmt: skip

    distill(config("whole"), log=lambda _m: None)
    records = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    skipped = [r["online_skipped_steps"] for r in records]
    boundary = torch.load(tmp_path / "whole" / "checkpoints" / "step_00000003.pt", weights_only=True)["state"]
    assert boundary["online_omitted"] and "model" not in boundary
    scale = boundary["online_scaler"]["scale"]
    assert scale == 2.0**16 / 2 ** sum(skipped[:3]) < 2.0**16, (scale, skipped)  # overflows at 2^16 on this model
    assert sum(skipped[3:]) < sum(skipped[:3])  # the second cycle starts at the lowered scale
    distill(config("part", iterations=3), log=lambda _m: None)
    distill(config("part", resume=True), log=lambda _m: None)
    whole, part = ((tmp_path / d / "synthetic.safetensors").read_bytes() for d in ("whole", "part"))
    assert whole == part


def test_each_modalitys_relative_step_is_logged_and_a_standstill_is_warned_once(tmp_path, capsys):
    from covmatch.analyze import modality_steps
    from covmatch.distill.cli import main as distill_main

    argv = ["--preset", "tiny", "--device", "cpu", "--no-progress", "--iterations", "4", "--log-every", "1"]
    assert distill_main([*argv, "--out", str(tmp_path / "even"), "--lr-img", "1000", "--lr-txt", "1"]) == 0
    records = [json.loads(line) for line in (tmp_path / "even" / "log.jsonl").read_text().splitlines()]
    assert all(r["rel_step_images"] > 0 and r["rel_step_captions"] > 0 for r in records)
    assert "warning" not in capsys.readouterr().err
    assert distill_main([*argv, "--out", str(tmp_path / "still"), "--lr-img", "1e-7"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "the images are barely distilled; consider a larger --lr-img" in warnings[0]
    steps = modality_steps(tmp_path / "still")
    assert steps["ratio"] > 30 and steps["images"]["mean"] < steps["captions"]["mean"]
    assert modality_steps(tmp_path / "nowhere") is None


BF16 = ("--bf16", "--image-size", str(BF16_TINY_IMAGE_SIZE))


@pytest.mark.parametrize("precision", [(), BF16], ids=["fp32", "bf16"])
def test_relative_steps_move_each_modality_by_its_learning_rate(tmp_path, precision):
    """With --relative-steps each gradient is scaled to its tensor's norm, so the first step (momentum buffer =
    gradient) moves each modality by its learning rate, whatever the loss."""
    from covmatch.distill.cli import main as distill_main

    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--device", "cpu", "--no-progress", "--iterations", "1", "--log-every", "1",
            "--relative-steps", "--lr-img", "0.002", "--lr-txt", "0.03", "--out", str(out), *precision]  # fmt: skip
    assert distill_main(argv) == 0
    (record,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert record["skipped_steps"] == 0
    # the log divides by the size after the step, the rescaling by the size before it (within a step's size)
    assert record["rel_step_images"] == pytest.approx(0.002, rel=0.002)
    assert record["rel_step_captions"] == pytest.approx(0.03, rel=0.03)
