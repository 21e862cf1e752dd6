"""The parts the commands are made of, each on its own: generated preset flags, the evaluation's result
files and training sets, the distillation's random streams and loss-scaled step."""

from __future__ import annotations

import json

import pytest
import torch

from covmatch.cli_args import PRESET_FLAG_HELP, OneLineArgumentParser, add_preset_flags, preset_overrides
from covmatch.distill.cli import build_parser, config_from_args
from covmatch.distill.config import PRESET_FLAG_FIELDS
from covmatch.distill.distributed import Ranks
from covmatch.distill.precision import ScaledStep
from covmatch.distill.streams import RealBatchSampler, stream_generator, synthetic_sample
from covmatch.errors import ConfigError
from covmatch.eval.metrics import metric_keys
from covmatch.eval.results import load_result, results_table, summarise_runs, write_result
from covmatch.presets import get_preset

# ---------------------------------------------------------------------------------------------- preset flags


def test_every_preset_flag_field_has_a_flag_that_sets_it(tmp_path):
    values = {"dataset": "shapes", "text_pooling": "mean", "learnable_temperature": True, "normalize_loss": True,
              "train_augment": True, "flip": True, "whiten_features": True, "relative_steps": True,
              "image_weights": "cache", "image_encoder": "test_vit", "image_encoder_kwargs": "patch_size=8",
              "text_encoder": "all-MiniLM-L6-v2"}  # fmt: skip
    argv = ["--preset", "tiny", "--out", str(tmp_path / "o")]
    for field in PRESET_FLAG_FIELDS:
        flag = "--" + field.replace("_", "-")
        value = values.get(field)
        if isinstance(value, bool):
            argv.append(flag)
            continue
        if value is None:
            kind = type(getattr(get_preset("tiny"), field) or 1)
            value = 3 if kind is int else 0.25
            value = {"seq_len": 10, "image_size": 16, "proj_depth": 2, "text_layers": 1, "syn_momentum": 0.25}.get(
                field, value
            )
        argv += [flag, str(value)]
    preset = config_from_args(build_parser().parse_args(argv)).preset
    for field in PRESET_FLAG_FIELDS:
        expected = values.get(field)
        if expected is None:
            expected = next(argv[i + 1] for i, a in enumerate(argv) if a == "--" + field.replace("_", "-"))
            expected = type(getattr(preset, field))(expected)
        assert getattr(preset, field) == expected, field


def test_unset_preset_flags_keep_the_preset():
    p = OneLineArgumentParser(prog="t")
    add_preset_flags(p, ("lr_img", "normalize_loss"), names={"lr_img": "--image-lr"})
    args = p.parse_args([])
    assert preset_overrides(args, ("lr_img", "normalize_loss")) == {"lr_img": None, "normalize_loss": None}
    assert get_preset("demo", **preset_overrides(args, ("lr_img",))).lr_img == get_preset("demo").lr_img
    assert p.parse_args(["--image-lr", "2", "--no-normalize-loss"]).lr_img == 2.0
    assert set(PRESET_FLAG_FIELDS) <= set(PRESET_FLAG_HELP)
    with pytest.raises(KeyError, match="not a Preset field"):
        add_preset_flags(p, ("no_such_field",))


def test_every_preset_field_declares_its_setting():
    import dataclasses

    from covmatch.presets import Preset
    from covmatch.settings import settings_of

    declared = {info.name for info in settings_of(Preset)}
    assert declared == {f.name for f in dataclasses.fields(Preset)} - {"name", "notes"}
    assert all(info.help for info in settings_of(Preset))


def test_a_new_setting_is_one_field_with_its_flag_help_and_range():
    """A dataclass field declared with ``setting`` gets its flag, its help with the real default, and its range
    check (naming the field in Python, the flag on the command line) without any other edit."""
    from dataclasses import dataclass

    from covmatch.cli_args import add_setting_flags, flags_of
    from covmatch.settings import between, check_settings, setting

    @dataclass
    class Toy:
        rate: float = setting(0.5, group="toy", range=between(0.0, 1.0), help="a rate")
        mode: str = setting("a", group="toy", choices=("a", "b"), help="a mode")
        hidden: int = setting(3, help="no flag")

    parser = OneLineArgumentParser(prog="toy")
    add_setting_flags({"toy": parser.add_argument_group("toy")}, Toy)
    text = " ".join(parser.format_help().split())
    assert "--rate X a rate (default: 0.5)" in text and "--mode {a,b} a mode (default: a)" in text
    assert "--hidden" not in text
    args = parser.parse_args(["--rate", "2", "--mode", "b"])
    toy = Toy(rate=args.rate, mode=args.mode)
    with pytest.raises(ConfigError) as err:
        check_settings(toy)
    assert str(err.value) == "rate must be in [0, 1], got 2.0"
    assert str(err.value.naming(flags_of(Toy))) == "--rate must be in [0, 1], got 2.0"


def test_help_shows_real_defaults_per_preset_and_readable_metavars():
    from covmatch.eval.cli import build_parser as eval_parser

    distill_help = " ".join(build_parser().format_help().split())
    eval_help = " ".join(eval_parser().format_help().split())
    for text in (distill_help, eval_help):
        assert "default: None" not in text and "LR_IMG" not in text and "EVAL_EPOCHS" not in text
    assert "--image-size N input resolution in pixels (default: paper 224, demo 32, glyphs 64, tiny 16)" in distill_help
    assert "--syn-momentum X SGD momentum of the synthetic set (default: 0.5)" in distill_help
    online_default = "(default: paper real, demo fixed, glyphs fixed, tiny real)"
    assert "--online {real,synthetic,fixed}" in distill_help and online_default in distill_help
    assert "--epochs N training epochs (default: paper 100, demo 100, glyphs 100, tiny 2)" in eval_help


def test_evaluation_protocol_numbers_come_from_the_preset_only():
    import dataclasses

    from covmatch.eval.protocol import EvalSettings

    protocol = ("epochs", "batch_size", "lr_encoder", "lr_proj", "momentum", "weight_decay")
    fields = {f.name: f for f in dataclasses.fields(EvalSettings)}
    assert all(fields[name].default is dataclasses.MISSING for name in protocol)
    preset = get_preset("demo", eval_epochs=7, eval_lr_proj=0.3)
    settings = EvalSettings.from_preset(preset)
    assert (settings.epochs, settings.batch_size, settings.lr_proj) == (7, preset.eval_batch, 0.3)


# ---------------------------------------------------------------------------------------------- results


def _result(values):
    runs = [{k: v for k in metric_keys()} for v in values]
    return {"method": "m", "num_pairs": 4, "runs": runs, "summary": summarise_runs(runs), "seconds": 1.0}


def test_result_files_round_trip_and_are_checked(tmp_path):
    result = _result([10.0, 14.0])
    write_result(tmp_path, result)
    assert load_result(tmp_path) == json.loads(json.dumps(result))
    assert (tmp_path / "results.md").read_text() == results_table([result])
    (tmp_path / "results.json").write_text(json.dumps({**result, "runs": []}))
    with pytest.raises(ConfigError, match="field 'runs' is empty"):
        load_result(tmp_path)


# ---------------------------------------------------------------------------------------------- streams


def test_streams_are_pure_functions_of_seed_stream_and_iteration():
    a = torch.randperm(50, generator=stream_generator(3, "real", 7))
    b = torch.randperm(50, generator=stream_generator(3, "real", 7))
    c = torch.randperm(50, generator=stream_generator(3, "synthetic", 7))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.randperm(5, generator=stream_generator(10**9, "reset", 10**6))  # any seed fits in 64 bits


def test_two_ranks_draw_disjoint_halves_of_the_union_batch():
    one = list(RealBatchSampler(100, 8, seed=1, start=4, stop=6))
    halves = [list(RealBatchSampler(100, 4, seed=1, start=4, stop=6, ranks=Ranks(r, 2))) for r in (0, 1)]
    for t in range(2):
        assert halves[0][t] + halves[1][t] == one[t]
    assert synthetic_sample(8, 8, 0, 0, Ranks()) is None  # N <= batch: all of the set
    rows = [synthetic_sample(12, 8, 0, 5, Ranks(r, 2)) for r in (0, 1)]
    assert [len(r) for r in rows] == [4, 4] and all(int(r.max()) < 6 for r in rows)


# ---------------------------------------------------------------------------------------------- precision


def test_scaled_step_skips_an_overflow_and_halves_the_scale():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    step = ScaledStep(opt, torch.device("cpu"), enabled=True, ranks=Ranks())
    scale = step.loss_scale()
    (w.sum() * scale * float("inf")).backward()
    assert float(step()) == 1.0 and torch.equal(w.detach(), torch.ones(3))
    assert step.scaler.get_scale() == float(scale) / 2
    opt.zero_grad()
    (w.sum() * step.loss_scale()).backward()
    assert float(step()) == 0.0 and torch.allclose(w.detach(), torch.full((3,), 0.9))
    plain = ScaledStep(opt, torch.device("cpu"), enabled=False, ranks=Ranks())
    assert plain.loss_scale() is None


@pytest.mark.parametrize("enabled", [True, False])
def test_scaled_step_rescales_the_unscaled_gradients_just_before_the_step(enabled):
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    step = ScaledStep(opt, torch.device("cpu"), enabled=enabled, ranks=Ranks())
    seen = []
    (w.sum() * (step.loss_scale() if enabled else 1.0)).backward()
    step(rescale=lambda: (seen.append(w.grad.clone()), w.grad.mul_(2.0)))
    assert torch.equal(seen[0], torch.ones(3)) and torch.allclose(w.detach(), torch.full((3,), 0.8))
