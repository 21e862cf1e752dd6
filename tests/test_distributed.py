"""Multi-process distillation and DeepSpeed ZeRO on CPU: 2 ranks, gloo, the ``tiny`` preset (docs/design.md,
*Sharded form*).

The launched tests start ``torchrun --nproc_per_node 2`` (DS_ACCELERATOR=cpu); the first DeepSpeed launch on
a machine also compiles DeepSpeed's small shared-memory communication op (cached afterwards).
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from covmatch.distill import DistillConfig, Distiller, DistillObjective, Features
from covmatch.distill.cli import main
from covmatch.distill.distributed import Ranks, build_ds_config, sum_over_ranks
from covmatch.distill.streams import stream_generator
from covmatch.errors import ConfigError
from covmatch.presets import get_preset
from covmatch.synthetic import SyntheticSet

from .fixtures import BF16_TINY_IMAGE_SIZE

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
deepspeed = pytest.importorskip("deepspeed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, nproc: int = 2, timeout: int = 300, expect: int = 0) -> str:
    """``torchrun --nproc_per_node nproc ARGS`` on CPU (``nproc=1``: plain ``python ARGS``, no launcher);
    returns its output, failing with its tail."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    proc = subprocess.run(
        [*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == expect, output[-4000:]
    return output


def distill_argv(out: Path, *extra: str) -> list:
    return ["-m", "covmatch.distill", "--preset", "tiny", "--device", "cpu", "--out", str(out), "--no-progress", *extra]


# ------------------------------------------------------------------------------------------ without a launch


def test_one_rank_is_the_identity():
    x = torch.randn(3, 4, requires_grad=True)
    assert sum_over_ranks(x, Ranks()) is x
    assert Ranks().shard(8) == slice(0, 8)
    assert Ranks(rank=1, world_size=2).shard(8) == slice(4, 8)


def test_ds_config_from_flags_and_a_user_file():
    cfg = build_ds_config(2, "bf16", 64, grad_clip=1.0)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["train_micro_batch_size_per_gpu"] == 64 and cfg["gradient_clipping"] == 1.0
    assert "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"]
    user = {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 10**8}, "bf16": {"enabled": False}}
    merged = build_ds_config(3, "fp32", 64, user_config=user)
    assert merged["zero_optimization"] == {"stage": 3, "stage3_max_live_parameters": 10**8}


def test_ds_config_always_states_the_clipping():
    """DeepSpeed clips at 1.0 by default from 0.19.3 on: --grad-clip 0 must reach it as 0, a user file may set
    it only where --grad-clip does not say otherwise."""
    assert build_ds_config(2, "fp32", 64)["gradient_clipping"] == 0.0
    assert build_ds_config(2, "fp32", 64, user_config={"gradient_clipping": 2.0})["gradient_clipping"] == 2.0
    assert (
        build_ds_config(2, "fp32", 64, grad_clip=2.0, user_config={"gradient_clipping": 2.0})["gradient_clipping"]
        == 2.0
    )
    with pytest.raises(ConfigError, match=r"gradient_clipping=2.0 contradicts --grad-clip 1.0"):
        build_ds_config(2, "fp32", 64, grad_clip=1.0, user_config={"gradient_clipping": 2.0})


FP16_MAX = 65504.0


def _gradscaler_skips(magnitudes) -> list:
    """Steps plain ``--fp16`` skips (torch.amp.GradScaler) when a step's gradient overflows fp16 exactly where
    its unscaled magnitude times the loss scale exceeds fp16's largest value."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.0)
    scaler = torch.amp.GradScaler("cpu")
    skipped = []
    for step, magnitude in enumerate(magnitudes):
        scaled = float(scaler.scale(torch.ones(()))) * magnitude
        param.grad = torch.full((1,), float("inf") if scaled > FP16_MAX else scaled)
        scaler.step(optimizer)
        scaler.update()
        if scaled > FP16_MAX:
            skipped.append(step)
    return skipped


def _deepspeed_scaler(fp16_section: dict):
    """DeepSpeed's dynamic loss scaler, built from an fp16 config section as its engine builds it."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    try:
        from deepspeed.runtime.precision_config import DeepSpeedFP16Config  # DeepSpeed >= 0.19
    except ImportError:
        from deepspeed.runtime.config import get_dynamic_loss_scale_args

        args = get_dynamic_loss_scale_args({"fp16": fp16_section})
    else:
        args = DeepSpeedFP16Config(**fp16_section).dynamic_loss_scale_args()
    return CreateLossScaler(dtype=torch.float16, static_loss_scale=0, dynamic_scaling=True, dynamic_loss_args=args)


def _deepspeed_skips(fp16_section: dict, magnitudes, scaler=None, first: int = 0) -> list:
    """The steps DeepSpeed's dynamic loss scaler skips (``scaler``: one already part-way, at step ``first``)."""
    scaler = scaler or _deepspeed_scaler(fp16_section)
    skipped = []
    for step, magnitude in enumerate(magnitudes, start=first):
        overflow = scaler.cur_scale * magnitude > FP16_MAX
        scaler.update_scale(overflow)
        if overflow:
            skipped.append(step)
    return skipped


def test_fp16_under_zero_skips_the_steps_plain_fp16_skips(monkeypatch):
    """DeepSpeed's loss scaler, as configured, skips the steps GradScaler skips: 2^16 at the start, halved at
    every overflow, doubled after 2,000 clean steps (DeepSpeed >= 0.19 doubles one step later). Its defaults
    would skip more: they halve at every second overflow and double every 1,000 steps."""
    import deepspeed.runtime.fp16.loss_scaler as loss_scaler

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda *args, **kwargs: 0)  # its overflow log asks
    magnitudes = [0.6] * 9000  # overflows at a scale of 2^17, so every doubling from 2^16 is undone
    magnitudes[100:103] = [3.0] * 3  # a burst that needs two halvings
    expected = _gradscaler_skips(magnitudes)
    assert expected[:2] == [100, 101] and len(expected) == 4, expected
    skipped = _deepspeed_skips(build_ds_config(2, "fp16", 64)["fp16"], magnitudes)
    assert len(skipped) == len(expected), (skipped, expected)
    assert all(abs(a - b) <= 3 for a, b in zip(skipped, expected)), (skipped, expected)  # a step per doubling
    defaults = {"enabled": True, "loss_scale": 0}
    assert len(_deepspeed_skips(defaults, magnitudes)) > len(expected)


def test_the_deepspeed_loss_scale_carries_over_a_reset_boundary_checkpoint(monkeypatch):
    """A checkpoint at a reset boundary keeps no DeepSpeed checkpoint, only the engine's step counters and its
    fp16 loss scaler's state: an engine resumed from it skips the steps the uninterrupted one skips."""
    import deepspeed.runtime.fp16.loss_scaler as loss_scaler

    from covmatch.distill.online import DeepSpeedOnlineModel

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda *args, **kwargs: 0)
    fp16 = build_ds_config(2, "fp16", 64)["fp16"]
    magnitudes = [0.6] * 9000
    magnitudes[100:103] = [3.0] * 3
    whole = _deepspeed_skips(fp16, magnitudes)

    def online_model(scaler) -> DeepSpeedOnlineModel:  # only the engine parts the boundary state touches
        model = DeepSpeedOnlineModel.__new__(DeepSpeedOnlineModel)
        counters = {"global_steps": 0, "global_samples": 0, "skipped_steps": 0}
        model.engine = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=scaler), **counters)
        return model

    before = online_model(_deepspeed_scaler(fp16))
    skipped = _deepspeed_skips(fp16, magnitudes[:4500], before.engine.optimizer.loss_scaler)
    before.engine.global_steps, before.engine.global_samples, before.engine.skipped_steps = 4500, 160000, 4
    buffer = io.BytesIO()
    torch.save(before.boundary_state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    after = online_model(_deepspeed_scaler(fp16))
    after.load_boundary_state_dict(state)
    assert (after.engine.global_steps, after.engine.global_samples, after.engine.skipped_steps) == (4500, 160000, 4)
    skipped += _deepspeed_skips(fp16, magnitudes[4500:], after.engine.optimizer.loss_scaler, first=4500)
    assert skipped == whole and len(whole) == 4, (skipped, whole)
    fresh = online_model(_deepspeed_scaler(fp16))  # without the saved state it would start again at 2^16
    assert _deepspeed_skips(fp16, magnitudes[4500:], fresh.engine.optimizer.loss_scaler, first=4500) != whole[2:]


def test_deepspeed_fp16_online_model_resumes_from_a_reset_boundary_checkpoint():
    """A real fp16 ZeRO-2 engine (on the CPU, told fp16 is supported): what a boundary checkpoint keeps of it
    makes a fresh engine train on as the uninterrupted one, skips, loss scale and weights alike."""
    output = launch(str(WORKER), "fp16-boundary", nproc=1)
    assert "fp16 ZeRO-2: resumed at a reset boundary" in output, output[-2000:]


@pytest.mark.parametrize(
    "stage,precision,user,message",
    [
        (0, "fp32", None, "DeepSpeed runs stages 1, 2 or 3"),
        (2, "fp32", {"optimizer": {"type": "Adam"}}, "'optimizer' is set by covmatch"),
        (2, "fp32", {"zero_optimization": {"stage": 3}}, "contradicts --zero 2"),
        (2, "bf16", {"bf16": {"enabled": False}}, "bf16.enabled contradicts"),
        (2, "fp32", {"gradient_accumulation_steps": 4}, "gradient_accumulation_steps must be 1"),
        (2, "fp32", {"train_batch_size": 7}, "train_batch_size=7"),
    ],
)
def test_ds_config_conflicts_are_one_line(stage, precision, user, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_ds_config(stage, precision, 64, user_config=user)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--fp16"], "--fp16 needs a CUDA GPU"),
        (["--deepspeed-config", "x.json"], "--deepspeed-config needs --zero 1, 2 or 3"),
        (["--zero", "2", "--deepspeed-config", "/no/such.json"], "--deepspeed-config /no/such.json: no such file"),
        (["--zero", "4"], "argument --zero: invalid choice"),
        (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    ],
)
def test_bad_distributed_flags_are_one_line(tmp_path, capsys, argv, message):
    if "--fp16" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    try:
        code = main(["--preset", "tiny", "--device", "cpu", "--out", str(out), "--no-progress", *argv])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_zero_without_deepspeed_installed_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a)
    )
    out = tmp_path / "run"
    code = main(["--preset", "tiny", "--device", "cpu", "--out", str(out), "--zero", "2", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "--zero 2 needs DeepSpeed: pip install 'covmatch[zero]'" in err and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_bad_json_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    code = main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "r"), "--zero", "2",
                 "--deepspeed-config", str(bad), "--no-progress"])  # fmt: skip
    assert code == 2
    assert f"--deepspeed-config {bad}: not valid JSON (line 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 2 ranks


def test_sharded_loss_equals_the_single_process_loss_on_the_union():
    """Loss and synthetic gradients from all-reduced statistics, fp64 and fp32, with/without mean term."""
    output = launch(str(WORKER), "loss")
    assert output.count("sharded loss == single-process loss") == 2


def test_chunked_gradient_on_two_ranks_with_a_sampled_batch():
    output = launch(str(WORKER), "chunked")
    assert output.count("chunked run == single-pass run") == 2


def test_online_steps_under_zero_equal_plain_pytorch():
    """fp32, one process: DeepSpeed's stages train the online model as plain PyTorch does with the same flags
    (DeepSpeed >= 0.19.3 would otherwise clip its gradients at 1.0: 30x shorter steps here)."""
    output = launch(str(WORKER), "online-steps", nproc=1)
    for stage in (1, 2, 3):
        assert f"ZeRO-{stage}: the online steps equal plain PyTorch's" in output, output[-2000:]
    if hasattr(deepspeed.utils.groups, "_release_process_group_references"):  # DeepSpeed >= 0.19.8
        assert "a second DeepSpeed run after close" in output, output[-2000:]


def test_reset_under_zero_restores_the_pretrained_state():
    """Twice each; under ZeRO-3 the second reset restores each rank's own partitions and gathers the heads
    only, with DeepSpeed's default persistence (the tiny model's parameters stay gathered) and with none."""
    output = launch(str(WORKER), "reset", "1:fp32,2:bf16,3:fp32,3:bf16:0")
    for case in ("ZeRO-1 fp32", "ZeRO-2 bf16", "ZeRO-3 fp32", "ZeRO-3 bf16 persistence 0"):
        assert output.count(f"{case}: the reset restores the pretrained state") == 2, case


def test_checkpointed_blocks_under_zero3_distil_what_a_plain_run_does():
    """Each block's recomputation in backward gathers its weights again (no parameter persistent): the set and
    the online model after four iterations and a reset equal those of the run without checkpointing."""
    output = launch(str(WORKER), "checkpointed")
    assert output.count("ZeRO-3 checkpointed run == plain run") == 2, output[-2000:]


@pytest.mark.slow
def test_compiled_encoders_under_zero2_take_the_eager_steps():
    """--compile --zero 2 (fp32, one process): the compiled encoders' gradients reach DeepSpeed's reduction and
    its steps, resets included; the set and the online model take the eager run's steps to 1e-3 of each (the
    online model's as one vector)."""
    output = launch(str(WORKER), "compiled", "2", nproc=1)
    assert "ZeRO-2: the compiled run takes the eager run's steps" in output, output[-2000:]


def held_out_loss(d: Distiller, syn: SyntheticSet, batches) -> float:
    """Distillation loss of ``syn`` at the t=0 online model over real batches the runs never see."""
    m = d.model
    m.reset(stream_generator(d.config.seed, "reset", 0))
    m.eval()
    total = 0.0
    with torch.no_grad():
        syn_features = Features(m.image(syn.images), m.text(syn.text_embeds, syn.attention_mask))
        for pixels, ids, mask, _ in batches:
            real = Features(m.image(pixels), m.text.encode_ids(ids, mask))
            total += float(DistillObjective(m, real, rho=d.config.rho, lam=d.config.lam)(syn_features)[0])
    return total / len(batches)


def checkpoint_names(out: Path) -> list:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def deepspeed_global_steps(checkpoint: Path) -> int:
    """DeepSpeed's step counter in its own checkpoint of the online model (its files hold pickled config
    objects; ZeRO-3 names its model states per rank)."""
    states = next((checkpoint.with_suffix(".online") / "online").glob("*model_states.pt"))
    return torch.load(states, weights_only=False)["global_steps"]


def test_zero2_bf16_run_resumes_bit_exactly_and_refuses_another_world_size(tmp_path):
    """ZeRO-2, bf16, 2 ranks, the tiny preset (reset every 3), checkpoints every 2: a run stopped at 4 (with
    DeepSpeed's checkpoint of the online model), resumed to 6 (a reset boundary: no DeepSpeed checkpoint, only
    its step counters) and from there to 7 distils the uninterrupted run's set bit for bit."""
    # --grad-clip 1.0: unclipped, the tiny preset's online model diverges within a reset cycle (InfoNCE 3.2 ->
    # 9.8 in three steps), and the set then does not lower the held-out loss; it also checks the flag reaches
    # DeepSpeed's config in a launched run
    bf16 = ("--zero", "2", "--bf16", "--image-size", str(BF16_TINY_IMAGE_SIZE), "--grad-clip", "1.0")
    flags = (*bf16, "--save-every", "2", "--log-every", "1")
    whole, split = tmp_path / "whole", tmp_path / "split"
    launch(*distill_argv(whole, *flags, "--iterations", "7"))
    launch(*distill_argv(split, *flags, "--iterations", "4"))
    syn = SyntheticSet.load(split)  # validates shapes, dtypes and metadata
    assert len(syn) == 8 and syn.metadata["iteration"] == 4
    assert checkpoint_names(split) == [
        "step_00000002.online",
        "step_00000002.pt",
        "step_00000004.online",
        "step_00000004.pt",
    ]
    output = launch(*distill_argv(split, *flags, "--iterations", "6", "--resume"))
    assert "resumed from" in output and "(iteration 4)" in output
    assert "step_00000006.pt" in checkpoint_names(split) and "step_00000006.online" not in checkpoint_names(split)
    boundary = torch.load(split / "checkpoints" / "step_00000006.pt", weights_only=True)["state"]
    assert boundary["online_omitted"] and boundary["online_engine_counters"]["global_steps"] == 6
    output = launch(*distill_argv(split, *flags, "--iterations", "7", "--resume"))
    assert "(iteration 6)" in output
    final, uninterrupted = SyntheticSet.load(split), SyntheticSet.load(whole)
    assert final.metadata["iteration"] == 7
    assert torch.equal(final.images, uninterrupted.images) and torch.equal(final.text_embeds, uninterrupted.text_embeds)
    logs = [[json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] for out in (whole, split)]
    assert [r["iteration"] for r in logs[1]] == list(range(1, 8))
    assert [r["online"] for r in logs[0]] == [r["online"] for r in logs[1]]  # the online model's InfoNCE too
    assert deepspeed_global_steps(whole / "checkpoints" / "step_00000007.pt") == 7
    assert deepspeed_global_steps(split / "checkpoints" / "step_00000007.pt") == 7  # counters carried over
    preset = get_preset("tiny", image_size=BF16_TINY_IMAGE_SIZE)
    d = Distiller(DistillConfig(preset=preset, progress=False, device="cpu"), log=lambda _m: None)
    held_out = list(d.real_batches(100, 104))
    before, after = held_out_loss(d, d.synthetic_set(), held_out), held_out_loss(d, final, held_out)
    assert after < 0.99 * before, (before, after)  # with the online model training (reset every 3)
    # one process cannot continue a 2-process run: one clear line, exit 2, nothing overwritten
    before = (split / "synthetic.safetensors").read_bytes()
    output = launch(*distill_argv(split, *bf16, "--iterations", "8", "--resume"), nproc=1, expect=2)
    assert "written by a run with 2 process(es), this run has 1; resume with the same world size" in output
    assert (split / "synthetic.safetensors").read_bytes() == before


def test_zero3_run_resumes_bit_exactly_from_a_reset_boundary_checkpoint(tmp_path):
    """ZeRO-3, fp32, 2 ranks: the reset gathers, restores and re-partitions the weights, so a checkpoint where
    the next iteration resets the online model needs no DeepSpeed checkpoint either."""
    flags = ("--zero", "3", "--grad-clip", "1.0", "--save-every", "3", "--log-every", "1")
    whole, split = tmp_path / "whole", tmp_path / "split"
    launch(*distill_argv(whole, *flags, "--iterations", "5"))
    assert checkpoint_names(whole) == ["step_00000003.pt", "step_00000005.online", "step_00000005.pt"]
    launch(*distill_argv(split, *flags, "--iterations", "3"))
    output = launch(*distill_argv(split, *flags, "--iterations", "5", "--resume"))
    assert "(iteration 3)" in output
    a, b = SyntheticSet.load(whole), SyntheticSet.load(split)
    assert torch.equal(a.images, b.images) and torch.equal(a.text_embeds, b.text_embeds)
    logs = [
        [json.loads(line)["online"] for line in (out / "log.jsonl").read_text().splitlines()] for out in (whole, split)
    ]
    assert logs[0] == logs[1]
    assert deepspeed_global_steps(split / "checkpoints" / "step_00000005.pt") == 5


def assert_same_set(sharded: SyntheticSet, single: SyntheticSet) -> None:
    """The pixels and token embeddings of two sets agree to float32 reduction-order differences."""
    for key in ("images", "text_embeds"):
        a, b = getattr(sharded, key), getattr(single, key)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), (key, (a - b).abs().max())


def test_zero3_run_equals_one_process_with_the_union_batch(tmp_path):
    """With a fixed online model, 2 ranks x real batch 8 (ZeRO-3) distil what 1 process does with 16."""
    out = tmp_path / "zero3"
    launch(*distill_argv(out, "--zero", "3", "--real-batch", "8", "--iterations", "12", "--online", "fixed"))
    sharded = SyntheticSet.load(out)
    config = DistillConfig(
        preset=get_preset("tiny", iterations=12, real_batch=16), online="fixed", progress=False, device="cpu"
    )
    d = Distiller(config, log=lambda _m: None)
    initial = d.synthetic_set()
    held_out = list(d.real_batches(100, 104))
    single = d.run()
    assert_same_set(sharded, single)
    before, after = held_out_loss(d, initial, held_out), held_out_loss(d, sharded, held_out)
    assert after < 0.97 * before, (before, after)


def test_augmented_run_on_two_ranks_equals_one_process_with_the_union_batch(tmp_path):
    """--dsa-shift / --dsa-scale: each rank resamples its shard of the set and its slice of the real batch
    through the maps one process with the union batch draws, so both distil the same set."""
    out = tmp_path / "dsa"
    augment = ("--dsa-shift", "0.125", "--dsa-scale", "0.1")
    launch(*distill_argv(out, "--real-batch", "8", "--iterations", "6", "--online", "fixed", *augment))
    sharded = SyntheticSet.load(out)
    config = DistillConfig(
        preset=get_preset("tiny", iterations=6, real_batch=16), online="fixed", progress=False, device="cpu",
        dsa_shift=0.125, dsa_scale=0.1,
    )  # fmt: skip
    d = Distiller(config, log=lambda _m: None)
    initial = d.synthetic_set()
    single = d.run()
    assert not torch.allclose(single.images, initial.images)
    assert_same_set(sharded, single)


def test_relative_steps_on_two_ranks_equal_one_process_with_the_union_batch(tmp_path):
    """--relative-steps: each modality's gradient norm and size are summed over the ranks' shards, so 2 ranks
    scale their shards' gradients as one process scales the whole set's."""
    out = tmp_path / "relative"
    rates = ("--relative-steps", "--lr-img", "0.003", "--lr-txt", "0.003")
    launch(*distill_argv(out, "--real-batch", "8", "--iterations", "6", "--online", "fixed", *rates))
    sharded = SyntheticSet.load(out)
    preset = get_preset("tiny", iterations=6, real_batch=16, relative_steps=True, lr_img=0.003, lr_txt=0.003)
    d = Distiller(DistillConfig(preset=preset, online="fixed", progress=False, device="cpu"), log=lambda _m: None)
    initial = d.synthetic_set()
    single = d.run()
    assert not torch.allclose(single.images, initial.images)
    assert_same_set(sharded, single)
