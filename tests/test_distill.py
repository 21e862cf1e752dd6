"""The distillation engine on the ``tiny`` preset: the loss falls, chunked == single pass, resume after
SIGKILL is bit-exact, every ablation switch runs, fp16 overflow skips the step, bad input exits 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch
from safetensors.torch import load_file

import covmatch.distill.objective as objective_module
from covmatch.distill import DistillConfig, Distiller, DistillObjective, Features, synthetic_backward
from covmatch.distill.cli import build_parser, config_from_args, main
from covmatch.distill.objective import encode_synthetic
from covmatch.distill.streams import stream_generator
from covmatch.errors import ConfigError
from covmatch.presets import get_preset
from covmatch.synthetic import SyntheticSet

from .fixtures import BF16_TINY_IMAGE_SIZE, import_extra


def tiny_config(**overrides) -> DistillConfig:
    preset_fields = {k: overrides.pop(k) for k in list(overrides) if k in get_preset("tiny").to_dict()}
    return DistillConfig(preset=get_preset("tiny", **preset_fields), progress=False, **overrides)


def quiet(_msg: str) -> None:
    pass


def held_out_objective(d: Distiller, batches) -> float:
    """Mean distillation loss of the current synthetic set over fixed real batches, at the t=0 model."""
    m = d.model
    m.reset(stream_generator(d.config.seed, "reset", 0))
    m.eval()
    total = 0.0
    with torch.no_grad():
        for px, ids, mask, _ in batches:
            obj = DistillObjective(
                m, Features(m.image(px), m.text.encode_ids(ids, mask)), rho=d.config.rho, lam=d.config.lam
            )
            total += float(obj(encode_synthetic(m, d.synthetic.batch(0)))[0]) / len(batches)
    return total


def test_online_mode_comes_from_the_preset_unless_a_flag_sets_it(tmp_path):
    def parse(*argv: str) -> DistillConfig:
        return config_from_args(build_parser().parse_args(["--out", str(tmp_path / "o"), *argv]))

    for name in ("tiny", "demo", "paper"):
        assert parse("--preset", name).online == get_preset(name).online
    assert get_preset("paper").online == "real"  # Algorithm 1
    assert parse("--preset", "demo", "--online", "synthetic").online == "synthetic"
    assert DistillConfig(preset=get_preset("tiny", online="fixed")).online == "fixed"
    assert DistillConfig(preset=get_preset("tiny", online="fixed"), online="real").online == "real"


def test_loss_falls_with_a_fixed_model():
    d = Distiller(tiny_config(iterations=20, online="fixed"), log=quiet)
    held_out = list(d.real_batches(100, 104))  # batches the run never sees
    before = held_out_objective(d, held_out)
    d.run()
    after = held_out_objective(d, held_out)
    assert after < 0.97 * before, (before, after)


def test_default_run_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--preset", "tiny", "--out", str(out), "--iterations", "4", "--save-every", "2", "--log-every", "1",
               "--no-progress", "--keep-checkpoints", "1"])  # fmt: skip
    assert rc == 0
    assert "8 synthetic pairs after 4 iterations" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert all(set(r) >= {"loss", "cov", "mean", "online", "s_per_it"} for r in records)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004.pt"]
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["grid_0000002.png", "grid_0000004.png"]
    syn = SyntheticSet.load(out)
    assert len(syn) == 8 and syn.metadata["iteration"] == 4
    assert syn.metadata["hyperparameters"]["resolved"] == {"rho": 2.0, "lam": 0.1, "iterations": 4}
    initial = SyntheticSet.load(out / "initial")  # the run's paired baseline
    assert initial.metadata["iteration"] == 0 and initial.metadata["changed_token_share"] == 0.0
    assert not torch.equal(initial.images, syn.images)
    assert 0.0 <= syn.metadata["changed_token_share"] <= 1.0


def test_report_to_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    """--report-to writes TensorBoard scalars and an offline wandb run beside log.jsonl; a resume continues
    both (the same wandb run id, no TensorBoard events past the resume point)."""
    import_extra("wandb", "logging")
    import_extra("tensorboard", "logging")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: no network needed
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    argv = [
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--log-every",
        "1",
        "--no-progress",
        "--report-to",
        "tensorboard,wandb",
    ]
    assert main([*argv, "--iterations", "2"]) == 0
    run_id = (out / "wandb" / "covmatch-run-id").read_text().strip()
    assert main([*argv, "--iterations", "3", "--resume"]) == 0
    assert (out / "wandb" / "covmatch-run-id").read_text().strip() == run_id
    offline = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and all(any(d.glob("*.wandb")) for d in offline)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("distill/cov")] == [1, 2, 3]
    assert [json.loads(line)["iteration"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    config = json.loads((out / "config.json").read_text())
    assert config["report_to"] == ["tensorboard", "wandb"]


def test_no_reporter_unless_asked(tmp_path):
    out = tmp_path / "run"
    assert main(["--preset", "tiny", "--out", str(out), "--iterations", "1", "--no-progress"]) == 0
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()


def _grads(d: Distiller, chunk):
    d.synthetic.images.grad = None
    d.synthetic.text_embeds.grad = None
    m = d.model
    with torch.no_grad():
        px, ids, mask, _ = next(iter(d.real_batches(0, 1)))
        real = Features(m.image(px.double()), m.text.encode_ids(ids, mask))
    obj = DistillObjective(m, real, rho=2.0, lam=0.3, backend="torch")
    parts = synthetic_backward(obj, d.synthetic.batch(0), chunk=chunk)
    return parts.total, d.synthetic.images.grad.clone(), d.synthetic.text_embeds.grad.clone()


def test_chunked_gradient_equals_single_pass_float64():
    d = Distiller(tiny_config(num_pairs=10, syn_batch=10, online="fixed"), log=quiet)
    d.model.double().eval()
    with torch.no_grad():
        d.synthetic.images.data = d.synthetic.images.data.double()
        d.synthetic.text_embeds.data = d.synthetic.text_embeds.data.double()
    loss, g_img, g_txt = _grads(d, None)
    for chunk in (1, 3, 4):
        loss_c, g_img_c, g_txt_c = _grads(d, chunk)
        assert abs(loss_c.item() - loss.item()) <= 1e-12 * abs(loss.item())
        torch.testing.assert_close(g_img_c, g_img, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(g_txt_c, g_txt, rtol=1e-9, atol=1e-14)
    assert g_img.abs().sum() > 0 and g_txt.abs().sum() > 0


class _LiveSavedBytes:
    """Peak bytes of activations held for backward (saved tensors alive at once), via autograd hooks."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def pack(self, t: torch.Tensor):
        size = t.numel() * t.element_size()
        box = _Box(t)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._release, size)
        return box

    def _release(self, size: int) -> None:
        self.live -= size

    @staticmethod
    def unpack(box):
        return box.tensor


class _Box:
    def __init__(self, tensor):
        self.tensor = tensor


def _peak_activation_bytes(num_pairs: int, chunk):
    d = Distiller(tiny_config(num_pairs=num_pairs, syn_batch=num_pairs, online="fixed"), log=quiet)
    m = d.model.eval()
    with torch.no_grad():
        px, ids, mask, _ = next(iter(d.real_batches(0, 1)))
        real = Features(m.image(px), m.text.encode_ids(ids, mask))
    obj = DistillObjective(m, real, rho=2.0, lam=0.1)
    meter = _LiveSavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        synthetic_backward(obj, d.synthetic.batch(0), chunk=chunk)
    return meter.peak


def test_chunked_activation_memory_is_flat_in_n():
    small, large = _peak_activation_bytes(8, 4), _peak_activation_bytes(32, 4)
    assert large <= 1.1 * small, (small, large)
    single_small, single_large = _peak_activation_bytes(8, None), _peak_activation_bytes(32, None)
    assert single_large > 2 * single_small  # without chunking it grows with N (weights are a constant part)


@pytest.mark.parametrize(
    "overrides",
    [
        {"frozen_text": True},
        {"frozen_text": True, "text_features": True},
        {"online": "synthetic"},
        {"online": "fixed"},
        {"distill_mode": "images"},
        {"distill_mode": "texts"},
        {"precision": "bf16", "image_size": BF16_TINY_IMAGE_SIZE},
        {"grad_checkpointing": True, "syn_chunk": 3},
        {"frozen_text": True, "text_features": True, "online": "synthetic", "syn_chunk": 5},
        {"proj_depth": 2, "learnable_temperature": True, "text_pooling": "mean"},
        {"init": "balanced"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_ablation_switches_run(overrides):
    d = Distiller(tiny_config(iterations=3, **overrides), log=quiet)
    images0, text0 = d.synthetic.images.detach().clone(), d.synthetic.text_embeds.detach().clone()
    features0 = None if d.synthetic.text_features is None else d.synthetic.text_features.detach().clone()
    text_params0 = {k: v.clone() for k, v in d.model.text.state_dict().items()}
    syn = d.run()
    assert torch.isfinite(syn.images).all() and torch.isfinite(syn.text_embeds).all()
    mode = overrides.get("distill_mode", "both")
    assert torch.equal(syn.images, images0) == (mode == "texts")
    if overrides.get("frozen_text"):
        for k, v in d.model.text.state_dict().items():
            assert torch.equal(v, text_params0[k]), k  # the text encoder was never trained
    if overrides.get("text_features"):
        assert torch.equal(syn.text_embeds, text0)  # captions live as features in this regime
        assert syn.text_features is not None and not torch.equal(syn.text_features, features0)
        assert syn.metadata["text_mode"] == "features"
    else:
        # token embeddings, learnt through the text encoder whether or not it is frozen
        assert syn.text_features is None and syn.metadata["text_mode"] == "embeddings"
        assert torch.equal(syn.text_embeds, text0) == (mode == "images")


def test_fp16_overflow_skips_the_step(monkeypatch):
    real_loss = objective_module.covmatch_loss
    calls = {"n": 0}

    def overflow_once(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("inf") if calls["n"] == 1 else loss

    monkeypatch.setattr(objective_module, "covmatch_loss", overflow_once)
    d = Distiller(tiny_config(iterations=2, precision="fp16"), log=quiet)
    images0 = d.synthetic.images.detach().clone()
    batches = iter(d.real_batches(0, 2))
    d.step(next(batches))
    scale_after_overflow = d.synthetic.scaled_step.scaler.get_scale()
    assert d.skipped_steps == 1
    assert torch.equal(d.synthetic.images, images0)  # the overflowing step was not applied
    assert scale_after_overflow == 65536.0 / 2
    d.step(next(batches))
    assert d.skipped_steps == 1 and not torch.equal(d.synthetic.images, images0)


def test_fp16_online_overflow_skips_the_online_step_and_is_counted(tmp_path, monkeypatch):
    """An online step whose InfoNCE overflows in fp16 is skipped (not applied), counted in log.jsonl as
    ``online_skipped_steps`` (with the steps fp16 itself overflows at the initial loss scale), and not taken
    for divergence."""
    from covmatch.distill.online import OnlineModel

    forward, weights = OnlineModel._forward, []

    def overflow_at_the_second_step(self, pixels, text):
        weights.append(self.model.head_parameters()[0].detach().clone())
        loss = forward(self, pixels, text)
        return loss * float("inf") if len(weights) == 2 else loss

    monkeypatch.setattr(OnlineModel, "_forward", overflow_at_the_second_step)
    out = tmp_path / "run"
    config = tiny_config(iterations=6, precision="fp16", online="real", reset_every=10, log_every=2, out=str(out))
    d = Distiller(config, log=quiet)
    d.run()
    weights.append(d.model.head_parameters()[0].detach().clone())
    unapplied = [int(torch.equal(before, after)) for before, after in zip(weights, weights[1:])]
    assert len(unapplied) == 6 and unapplied[1] == 1 and 0 in unapplied
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["online_skipped_steps"] for r in records] == [sum(unapplied[i : i + 2]) for i in (0, 2, 4)]


def _run_cli(out, *extra):
    cmd = [sys.executable, "-m", "covmatch.distill", "--preset", "tiny", "--out", str(out), "--iterations", "8",
           "--save-every", "2", "--no-progress", "--device", "cpu", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tmp_path):
    straight = _run_cli(tmp_path / "straight")
    killed = _run_cli(tmp_path / "killed")
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "checkpoints" / "step_00000004.pt").exists():
        assert killed.poll() is None, killed.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert straight.wait(timeout=240) == 0, straight.communicate()
    resumed = _run_cli(tmp_path / "killed", "--resume")
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert "resumed from" in err
    a = load_file(str(tmp_path / "straight" / "synthetic.safetensors"))
    b = load_file(str(tmp_path / "killed" / "synthetic.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_skips_truncated_and_mismatched_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--preset", "tiny", "--out", str(out), "--iterations", "4", "--save-every", "2", "--no-progress"]) == 0
    newest = out / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    assert main(["--preset", "tiny", "--out", str(out), "--iterations", "6", "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_00000004.pt: unreadable or truncated" in err
    assert "resumed from" in err and "(iteration 2)" in err
    # no checkpoint fits another N: refused in one line, nothing touched
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["--preset", "tiny", "--out", str(out), "--num-pairs", "6", "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made with num_pairs=8, this run has num_pairs=6" in err[0]
    assert "nothing was changed" in err[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_auto_resume_starts_an_empty_out_and_continues_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--out", str(out), "--save-every", "2", "--no-progress", "--auto-resume"]
    assert main([*argv, "--iterations", "2"]) == 0  # nothing there: starts
    assert "resumed" not in capsys.readouterr().err
    assert main([*argv, "--iterations", "4"]) == 0  # a run there: continues it
    assert "resumed from" in capsys.readouterr().err
    assert SyntheticSet.load(out).metadata["iteration"] == 4
    assert [json.loads(line)["iteration"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 4]


def test_auto_resume_starts_over_a_run_stopped_before_its_first_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--out", str(out), "--save-every", "2", "--no-progress", "--auto-resume"]
    assert main([*argv, "--iterations", "2"]) == 0
    shutil.rmtree(out / "checkpoints")
    (out / "synthetic.safetensors").unlink()  # what a run killed before its first save leaves: iteration 0's files
    assert main([*argv, "--iterations", "2"]) == 0
    assert "resumed" not in capsys.readouterr().err and SyntheticSet.load(out).metadata["iteration"] == 2
    assert [json.loads(line)["iteration"] for line in (out / "log.jsonl").read_text().splitlines()] == [2]


def test_diverging_run_stops_in_one_line_and_keeps_the_last_good_state(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    base = ["--preset", "tiny", "--out", str(out), "--save-every", "2", "--log-every", "3", "--no-progress"]
    assert main([*base, "--iterations", "4"]) == 0
    kept = lambda p: p.is_file() and p.suffix != ".png" and p.name != "config.json"  # noqa: E731 (the resumed run's own config)
    good = {p: p.read_bytes() for p in out.rglob("*") if kept(p)}
    real_loss = objective_module.covmatch_loss
    calls = {"n": 0}

    def nan_from_the_second_call(*args, **kwargs):  # iteration 6 of the resumed run (5 is the first)
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(objective_module, "covmatch_loss", nan_from_the_second_call)
    capsys.readouterr()
    assert main([*base, "--iterations", "8", "--resume"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "resumed from" in err[0], err  # the resume note, then the one error line
    assert "distillation diverged at iteration 6: the covariance term ||rho C_T - C_S||^2 became nan" in err[1]
    assert "step_00000004.pt" in err[1] and "hold the last good state" in err[1] and "try a lower --lr-img" in err[1]
    # iteration 6 would have been saved: the files of iteration 4 are untouched, and resumable
    assert {p: p.read_bytes() for p in out.rglob("*") if kept(p)} == good
    assert SyntheticSet.load(out).metadata["iteration"] == 4


def test_files_follow_the_umask(tmp_path):
    from covmatch.synthetic import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "shared.bin", b"x")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.bin").stat().st_mode & 0o777 == 0o600


def test_a_run_writes_group_readable_files_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(["--preset", "tiny", "--out", str(out), "--iterations", "2", "--no-progress"]) == 0
    finally:
        os.umask(old)
    for path in (out / "synthetic.safetensors", out / "synthetic.json", out / "checkpoints" / "step_00000002.pt"):
        assert path.stat().st_mode & 0o777 == 0o644, path


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--num-pairs", "x"], "argument --num-pairs: invalid int value: 'x'"),
        (["--online", "sometimes"], "argument --online: invalid choice"),
        (["--fp16", "--bf16"], "not allowed with argument"),
        (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
        (["--syn-chunk", "0"], "--syn-chunk must be >= 1"),
        (["--num-pairs", "1"], "--num-pairs must be >= 2"),
        (["--num-pairs", "500"], "--num-pairs 500 is larger than the train split (64 images)"),
        (["--dataset", "karpathy"], "--dataset karpathy needs --ann-root DIR and --image-root DIR"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--text-encoder", "/no/such/model"], "not a local model directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    try:
        code = main(["--preset", "tiny", "--out", str(out), "--no-progress", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_existing_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["--preset", "tiny", "--out", str(out), "--no-progress"]) == 2
    assert "already exists; pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--out", str(out), "--no-progress", "--iterations", "1", "--overwrite"]) == 0
    assert (out / "keep.txt").read_text() == "user data"  # --overwrite removes run files only


def test_channels_last_distils_the_same_set():
    """``--channels-last`` changes the image encoder's memory layout only: same set up to rounding."""
    plain = Distiller(tiny_config(iterations=3), log=quiet).run()
    nhwc = Distiller(tiny_config(iterations=3, channels_last=True), log=quiet).run()
    torch.testing.assert_close(nhwc.images, plain.images, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nhwc.text_embeds, plain.text_embeds, rtol=1e-4, atol=1e-4)


def _to_float64(d: Distiller) -> None:
    """The online model and the synthetic tensors in float64 (real pixels follow the synthetic dtype)."""
    d.model.double()
    with torch.no_grad():
        d.synthetic.images.data = d.synthetic.images.data.double()
        d.synthetic.text_embeds.data = d.synthetic.text_embeds.data.double()


@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_chunked_run_equals_single_pass_when_the_batch_samples_the_set(grad_checkpointing):
    """N = 12 > syn batch 8, so each iteration's batch is a sample of the set; 5 iterations with the online
    model training on real data and a reset at t = 3; float64: the chunked run distils the same set."""
    sets = {}
    for chunk in (None, 3):
        config = tiny_config(num_pairs=12, syn_batch=8, iterations=5, online="real", syn_chunk=chunk,
                             grad_checkpointing=grad_checkpointing)  # fmt: skip
        d = Distiller(config, log=quiet)
        _to_float64(d)
        initial = d.synthetic_set()
        sets[chunk] = d.run()
    single, chunked = sets[None], sets[3]
    assert not torch.equal(single.images, initial.images) and not torch.equal(single.text_embeds, initial.text_embeds)
    torch.testing.assert_close(chunked.images, single.images, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(chunked.text_embeds, single.text_embeds, rtol=1e-9, atol=1e-12)


def test_chunked_cli_run_with_a_sampled_batch(tmp_path):
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--num-pairs", "12", "--iterations", "3", "--syn-chunk", "5", "--out", str(out),
            "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert SyntheticSet.load(out).metadata["iteration"] == 3


def test_data_seed_alone_draws_the_data_and_is_recorded(tmp_path):
    def pairs(**overrides):
        return Distiller(tiny_config(**overrides), log=quiet).train_data.pairs

    assert pairs(seed=1) == pairs(seed=0)  # --seed no longer redraws the dataset
    assert pairs(data_seed=1) != pairs(data_seed=0)
    out = tmp_path / "run"
    assert main(["--preset", "tiny", "--out", str(out), "--iterations", "1", "--data-seed", "2", "--no-progress"]) == 0
    assert SyntheticSet.load(out).metadata["data_seed"] == 2


def test_captions_are_decoded_in_the_pretrained_embedding_table():
    from covmatch.visualize import nearest_token_ids

    d = Distiller(tiny_config(iterations=3, online="real", reset_every=100, online_lr_encoder=1.0), log=quiet)
    pretrained = d.model.text.embedding_table.detach().clone()
    syn = d.run()
    assert not torch.equal(d.model.text.embedding_table.detach(), pretrained)  # the online model's table drifted
    assert torch.equal(syn.nearest_token_ids, nearest_token_ids(syn.text_embeds, pretrained))


@pytest.mark.parametrize("order,expected", [("paper", ["online step", "target features"]),
                                            ("loss-first", ["target features", "online step"])])  # fmt: skip
def test_step_order(order, expected):
    """The paper's order: the online model steps on a real batch of its own, then the statistics are taken
    with the updated model; --step-order loss-first keeps the earlier order (on the target's batch)."""
    d = Distiller(tiny_config(iterations=2, step_order=order), log=quiet)
    calls = []
    for name, label in (("train_step", "online step"), ("encode_real", "target features")):
        original = getattr(d.online, name)
        setattr(d.online, name, lambda *a, _f=original, _l=label: calls.append(_l) or _f(*a))
    d.step(next(iter(d.real_batches(0, 1))))
    assert calls == expected
    target = next(iter(d.real_batches(0, 1)))[3]
    online = next(iter(d.online_batches(0, 1)))
    if order == "paper":
        assert not torch.equal(online[3], target)  # drawn from its own stream
    else:
        assert online is None  # the online step takes the target's batch


def test_normalised_loss_keeps_lambdas_meaning_and_is_set_at_resets():
    """Both terms share one scale, 1 / ||rho C_T||^2 of the batch at the last reset: mean/cov is the raw
    loss's ratio, and the scale does not change between resets (tiny: reset every 3 iterations)."""
    d = Distiller(tiny_config(iterations=5, normalize_loss=True, lam=0.5, lr_img=1e-3, lr_txt=1e-6), log=quiet)
    scales = []
    for batch in d.real_batches(0, 5):
        metrics = d.step(batch)
        scales.append(float(d.loss_normaliser))
        assert float(metrics["loss"]) == pytest.approx(float(metrics["cov"] + 0.5 * metrics["mean"]), rel=1e-6)
    assert scales[0] == scales[1] == scales[2] != scales[3] == scales[4]
    real = d.online.encode_real(*d._to_device(next(iter(d.real_batches(7, 8)))))
    raw = DistillObjective(d.model, real, rho=d.config.rho, lam=0.5)
    scaled = DistillObjective(d.model, real, rho=d.config.rho, lam=0.5, scale=raw.covariance_scale())
    with torch.no_grad():
        feats = encode_synthetic(d.model.eval(), d.synthetic.batch(0))
        (_, raw_cov, raw_mean), (_, cov, mean) = raw(feats), scaled(feats)
    assert float(mean / cov) == pytest.approx(float(raw_mean / raw_cov), rel=1e-5)


def test_target_batch_uses_the_evaluation_transform_unless_asked():
    def two_loads(data):
        return data[0][0], data[0][0]

    for augment in (False, True):
        d = Distiller(tiny_config(train_augment=True, flip=True, target_augment=augment), log=quiet)
        a, b = two_loads(d.target_data)
        assert torch.equal(a, b) != augment  # random crops and flips only when asked
        a, b = two_loads(d.train_data)
        assert not torch.equal(a, b)  # the online model's batches keep the train augmentation


def test_text_features_need_a_frozen_text_encoder():
    """The Python API names the fields; the command names its flags (``ConfigError.naming``)."""
    from covmatch.distill.cli import FLAGS

    with pytest.raises(ConfigError, match="text_features learns captions as features of a frozen text encoder") as err:
        tiny_config(text_features=True)
    named = str(err.value.naming(FLAGS))
    assert named.startswith("--text-features learns captions as features of a frozen text encoder")
    assert named.endswith("add --frozen-text")


def test_a_runs_config_json_reruns_it_and_flags_override_it(tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["--preset", "tiny", "--out", str(first), "--iterations", "2", "--seed", "3", "--no-progress"]) == 0
    again = tmp_path / "again"
    assert main(["--config", str(first / "config.json"), "--out", str(again)]) == 0
    assert (again / "synthetic.safetensors").read_bytes() == (first / "synthetic.safetensors").read_bytes()
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"preset: {{name: tiny}}\nseed: 3\niterations: 2\nout: {tmp_path / 'yaml'}\nno-progress: true\n"
    )
    assert main(["--config", str(yaml_file), "--iterations", "1"]) == 0  # the flag wins over the file
    assert SyntheticSet.load(tmp_path / "yaml").metadata["iteration"] == 1
    assert SyntheticSet.load(tmp_path / "yaml").metadata["hyperparameters"]["seed"] == 3


def test_chunked_gradient_through_the_fused_loss_with_scales():
    """--syn-chunk takes the feature gradients from ``covmatch_loss_with_grads`` (the fused path here, the
    interpreter on CPU): with the scale-free loss's factor and an AMP-style loss scale, the same gradients as
    one autograd pass."""
    pytest.importorskip("triton")
    d = Distiller(tiny_config(num_pairs=10, syn_batch=10, online="fixed"), log=quiet)
    m = d.model.eval()
    with torch.no_grad():
        px, ids, mask, _ = next(iter(d.real_batches(0, 1)))
        real = Features(m.image(px), m.text.encode_ids(ids, mask))
    results = []
    for chunk in (None, 4):
        d.synthetic.images.grad = None
        d.synthetic.text_embeds.grad = None
        obj = DistillObjective(m, real, rho=2.0, lam=0.3, backend="triton", scale=torch.tensor(0.5))
        parts = synthetic_backward(obj, d.synthetic.batch(0), chunk=chunk, loss_scale=torch.tensor(4.0))
        results.append((parts.total, d.synthetic.images.grad.clone(), d.synthetic.text_embeds.grad.clone()))
    (loss, g_img, g_txt), (loss_c, g_img_c, g_txt_c) = results
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_img_c, g_img, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_txt_c, g_txt, rtol=1e-4, atol=1e-7)
    assert g_img.abs().sum() > 0 and g_txt.abs().sum() > 0
