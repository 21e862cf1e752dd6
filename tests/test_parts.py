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
