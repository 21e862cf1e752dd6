"""Bad input, table-driven: flags, data files, weights, DeepSpeed configs, checkpoints, synthetic sets and
result folders, across ``covmatch-distill``, ``covmatch-eval`` and the loss API.

Every command case asserts exit code 2, one line on stderr that names the problem and where (file, field or
flag), no traceback, and that nothing under the test's folder was written, changed or removed. Every API case
asserts the exception type and its message.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import pytest
import torch

from covmatch import covmatch_loss, cross_covariance, mean_matching_loss
from covmatch.distill.cli import main as distill_main
from covmatch.eval.cli import main as eval_main

from .fixtures import make_karpathy_fixture


@dataclass(frozen=True)
class Case:
    """One class of bad input: ``argv`` may hold {tmp}, {ann}, {images}, {run}, {set}, {result} placeholders,
    filled from the folders ``prepare`` makes (it may damage them first)."""

    id: str
    command: str  # "distill" or "eval"
    argv: Sequence[str]
    message: str
    prepare: Optional[Callable[[Path], None]] = None
    # "karpathy", "run" (a finished tiny run), "result" (an eval results folder), or an optional package
    # ("deepspeed", "datasets") the case is skipped without
    needs: Sequence[str] = ()
    missing: Sequence[str] = ()  # optional packages made unimportable for the case


def _edit_json(path: Path, edit: Callable) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def _karpathy(edit_file: str, edit: Callable) -> Callable[[Path], None]:
    return lambda tmp: _edit_json(tmp / "data" / "annotations" / edit_file, edit)


def _write(relative: str, content: bytes) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp / relative).write_bytes(content)

    return prepare


def _truncate(relative: str, keep: int = 100) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        path = tmp / relative
        path.write_bytes(path.read_bytes()[:keep])

    return prepare


def _remove(relative: str) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        path = tmp / relative
        if path.is_dir():
            for child in sorted(path.rglob("*"), reverse=True):
                child.rmdir() if child.is_dir() else child.unlink()
            path.rmdir()
        else:
            path.unlink()

    return prepare


def _set_nan_tensor(tmp: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = tmp / "run" / "synthetic.safetensors"
    tensors = load_file(str(path))
    tensors["images"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "covmatch"})


def _bad_boundary_checkpoint(tmp: Path) -> None:
    """The newest checkpoint made a reset-boundary one whose DeepSpeed counters are not numbers; the older one
    truncated, so that no checkpoint can be resumed."""
    checkpoints = tmp / "run" / "checkpoints"
    payload = torch.load(checkpoints / "step_00000004.pt", weights_only=True)
    payload["state"] = {k: v for k, v in payload["state"].items() if k not in ("model", "online_optimizer")}
    payload["state"].update(online_omitted=True, online_engine_counters={"global_steps": "four"})
    torch.save(payload, checkpoints / "step_00000004.pt")
    _truncate("run/checkpoints/step_00000002.pt")(tmp)


def _wrong_shape_weights(tmp: Path) -> None:
    from safetensors.torch import save_file

    save_file({"stem.conv1.weight": torch.zeros(3, 3)}, str(tmp / "weights.safetensors"))


KARPATHY = [
    "--dataset",
    "karpathy",
    "--ann-root",
    "{ann}",
    "--image-root",
    "{images}",
    "--validate-data",
    "--num-pairs",
    "4",
]
TRAIN_JSON = "flickr30k_train.json"

DISTILL_CASES = [
    # numeric flags: finite, in range, consistent
    Case("lr-img-nan", "distill", ["--lr-img", "nan"], "--lr-img must be a finite number, got nan"),
    Case("lr-txt-negative", "distill", ["--lr-txt", "-1"], "--lr-txt must be >= 0.0, got -1.0"),
    Case("lam-inf", "distill", ["--lam", "inf"], "--lam must be a finite number, got inf"),
    Case("lam-negative", "distill", ["--lam", "-0.1"], "--lam must be >= 0.0"),
    Case("rho-zero", "distill", ["--rho", "0"], "--rho must be > 0, got 0.0"),
    Case("rho-nan", "distill", ["--rho", "nan"], "--rho must be a finite number"),
    Case("seq-len-zero", "distill", ["--seq-len", "0"], "--seq-len must be >= 2"),
    Case("image-size-zero", "distill", ["--image-size", "0"], "--image-size must be >= 8 pixels, got 0"),
    Case("proj-dim-zero", "distill", ["--proj-dim", "0"], "--proj-dim must be >= 1, got 0"),
    Case("text-layers-zero", "distill", ["--text-layers", "0"], "--text-layers must be >= 1, got 0"),
    Case("text-layers-too-many", "distill", ["--text-layers", "9"], "has 2 layers; cannot keep 9"),
    Case("syn-momentum-one", "distill", ["--syn-momentum", "1"], "--syn-momentum must be in [0, 1), got 1.0"),
    Case("online-momentum-neg", "distill", ["--online-momentum", "-0.5"], "--online-momentum must be in [0, 1)"),
    Case("online-lr-inf", "distill", ["--online-lr-encoder", "inf"], "--online-lr-encoder must be a finite number"),
    Case("real-batch-one", "distill", ["--real-batch", "1"], "--real-batch must be >= 2"),
    Case("syn-batch-one", "distill", ["--syn-batch", "1"], "--syn-batch must be >= 2"),
    Case("reset-every-zero", "distill", ["--reset-every", "0"], "--reset-every must be >= 1, got 0"),
    Case("iterations-negative", "distill", ["--iterations", "-3"], "--iterations must be >= 0, got -3"),
    Case("num-pairs-one", "distill", ["--num-pairs", "1"], "--num-pairs must be >= 2"),
    Case("num-pairs-too-many", "distill", ["--num-pairs", "500"], "--num-pairs 500 is larger than the train split"),
    Case("save-every-zero", "distill", ["--save-every", "0"], "--save-every must be >= 1, got 0"),
    Case("log-every-zero", "distill", ["--log-every", "0"], "--log-every must be >= 1, got 0"),
    Case("keep-zero", "distill", ["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1, got 0"),
    Case("syn-chunk-zero", "distill", ["--syn-chunk", "0"], "--syn-chunk must be >= 1, got 0"),
    Case("workers-negative", "distill", ["--workers", "-1"], "--workers must be >= 0, got -1"),
    Case("seed-negative", "distill", ["--seed", "-1"], "--seed must be >= 0, got -1"),
    Case("grad-clip-nan", "distill", ["--grad-clip", "nan"], "--grad-clip must be a finite number, got nan"),
    Case("dsa-shift-negative", "distill", ["--dsa-shift", "-0.1"], "--dsa-shift must be in [0, 0.5], got -0.1"),
    Case("dsa-scale-nan", "distill", ["--dsa-scale", "nan"], "--dsa-scale must be a finite number, got nan"),
    Case("int-flag-not-int", "distill", ["--real-batch", "8.5"], "argument --real-batch: invalid int value: '8.5'"),
    Case("report-to-unknown", "distill", ["--report-to", "tensorboard,mlflow"], "argument --report-to: unknown destination 'mlflow'; choose from tensorboard, wandb"),
    Case("report-to-without-tensorboard", "distill", ["--report-to", "tensorboard"],
         "--report-to tensorboard needs the tensorboard package: pip install 'covmatch[logging]'", missing=["tensorboard"]),
    Case("report-to-without-wandb", "distill", ["--report-to", "wandb"],
         "--report-to wandb needs the wandb package: pip install 'covmatch[logging]'", missing=["wandb"]),
    Case("resume-and-overwrite", "distill", ["--resume", "--overwrite"], "--resume and --overwrite contradict"),
    Case("auto-resume-and-resume", "distill", ["--auto-resume", "--resume"], "--auto-resume and --resume contradict"),
    Case("unknown-image-encoder", "distill", ["--image-encoder", "no_such_net"], "unknown timm image encoder"),
    Case("image-encoder-kwargs-not-pairs", "distill", ["--image-encoder-kwargs", "patch_size"],
         "--image-encoder-kwargs must be key=value pairs separated by commas, got 'patch_size'"),
    Case("image-encoder-kwargs-not-taken", "distill", ["--image-encoder-kwargs", "patch_size=8"],
         "timm model 'test_nfnet' does not take --image-encoder-kwargs {'patch_size': 8}"),
    Case("text-encoder-missing", "distill", ["--text-encoder", "/no/such/model"], "not a local model directory"),
    Case("seq-len-beyond-encoder", "distill", ["--seq-len", "1000"], "--seq-len 1000 is more than text encoder 'all-MiniLM-L6-v2' supports (512 positions)"),
    Case("seq-len-beyond-encoder-overwrite", "distill", ["--seq-len", "600", "--overwrite"], "--seq-len 600 is more than text encoder", needs=("run",)),
    # weights
    Case("weights-missing", "distill", ["--image-weights", "{tmp}/none.safetensors"], "none.safetensors: weights file not found"),
    Case("weights-corrupt", "distill", ["--image-weights", "{tmp}/weights.safetensors"], "weights.safetensors: not a readable safetensors file",
         prepare=_write("weights.safetensors", b"\x00garbage" * 10)),
    Case("weights-pth-not-weights-only", "distill", ["--image-weights", "{tmp}/weights.pth"], "weights.pth: cannot load as a weights-only torch checkpoint",
         prepare=_write("weights.pth", b"not a zip archive")),
    Case("weights-wrong-shapes", "distill", ["--image-weights", "{tmp}/weights.safetensors"], "weights.safetensors: tensor 'stem.conv1.weight' has shape (3, 3), the model expects",
         prepare=_wrong_shape_weights),
    # data files (Karpathy JSON and images)
    Case("data-roots-missing", "distill", ["--dataset", "karpathy"], "--dataset karpathy needs --ann-root DIR and --image-root DIR"),
    Case("data-ann-dir-missing", "distill", ["--dataset", "karpathy", "--ann-root", "{tmp}/nope", "--image-root", "{images}"],
         "nope: annotation directory not found", needs=["karpathy"]),
    Case("data-malformed-json", "distill", KARPATHY, f"{TRAIN_JSON}: malformed JSON at line 1",
         prepare=_write("data/annotations/" + TRAIN_JSON, b'[{"image": "a.jpg",'), needs=["karpathy"]),
    Case("data-not-a-list", "distill", KARPATHY, f"{TRAIN_JSON}: expected a JSON list of entries, got dict",
         prepare=_karpathy(TRAIN_JSON, lambda d: {"images": d}), needs=["karpathy"]),
    Case("data-missing-field", "distill", KARPATHY, f"{TRAIN_JSON}: entry 2 has no 'caption' field",
         prepare=_karpathy(TRAIN_JSON, lambda d: d[:2] + [{"image": d[2]["image"]}] + d[3:]), needs=["karpathy"]),
    Case("data-wrong-type", "distill", KARPATHY, f"{TRAIN_JSON}: entry 0 field 'caption' must be a string in the train split",
         prepare=_karpathy(TRAIN_JSON, lambda d: [{**d[0], "caption": 7}] + d[1:]), needs=["karpathy"]),
    Case("data-missing-split", "distill", KARPATHY, "no annotation file for split 'test'",
         prepare=_remove("data/annotations/flickr30k_test.json"), needs=["karpathy"]),
    Case("data-missing-image", "distill", KARPATHY, "1003.jpg: image file not found (named in",
         prepare=_remove("data/images/flickr30k-images/1003.jpg"), needs=["karpathy"]),
    Case("data-corrupt-image", "distill", KARPATHY, "1002.jpg: unreadable or corrupt image",
         prepare=_write("data/images/flickr30k-images/1002.jpg", b"\xff\xd8 not a jpeg"), needs=["karpathy"]),
    Case("data-karpathy-single-file-split", "distill", ["--dataset", "karpathy", "--ann-root", "{tmp}/dataset_coco.json", "--image-root", "{images}"],
         "dataset_coco.json: images[0] field 'split' must be one of train, restval, val, test, got 'dev'",
         prepare=_write("dataset_coco.json", b'{"images": [{"filename": "a.jpg", "split": "dev", "sentences": [{"raw": "a"}]}]}'),
         needs=["karpathy"]),
    Case("init-balanced-without-labels", "distill", [*KARPATHY, "--init", "balanced"],
         "--init balanced needs class labels: the embedded dataset has them, this data has none", needs=["karpathy"]),
    Case("data-hf-no-dir", "distill", ["--dataset", "hf"], "--dataset hf needs --data-dir DIR"),
    Case("data-hf-dir-missing", "distill", ["--dataset", "hf", "--data-dir", "{tmp}/nope"], "nope: --data-dir folder not found",
         needs=["datasets"]),
    Case("data-hf-not-a-dataset", "eval", ["--coreset", "random", "--dataset", "hf", "--data-dir", "{tmp}/empty"],
         "empty: not a readable Hugging Face dataset", prepare=lambda tmp: (tmp / "empty").mkdir(), needs=["datasets"]),
    Case("data-hf-without-datasets", "distill", ["--dataset", "hf", "--data-dir", "{tmp}"],
         "--dataset hf needs the Hugging Face datasets package: pip install 'covmatch[data]'", missing=["datasets"]),
    Case("data-hf-without-datasets", "eval", ["--coreset", "random", "--dataset", "hf", "--data-dir", "{tmp}"],
         "--dataset hf needs the Hugging Face datasets package: pip install 'covmatch[data]'", missing=["datasets"]),
    # DeepSpeed configs
    Case("ds-config-missing", "distill", ["--zero", "2", "--deepspeed-config", "{tmp}/none.json"], "--deepspeed-config",
         needs=["deepspeed"]),
    Case("ds-config-malformed", "distill", ["--zero", "2", "--deepspeed-config", "{tmp}/ds.json"], "not valid JSON (line 1",
         prepare=_write("ds.json", b'{"zero_optimization": {"stage": 2,}}'), needs=["deepspeed"]),
    Case("ds-config-contradicts", "distill", ["--zero", "2", "--deepspeed-config", "{tmp}/ds.json"], "zero_optimization.stage=3 contradicts --zero 2",
         prepare=_write("ds.json", b'{"zero_optimization": {"stage": 3}}'), needs=["deepspeed"]),
    Case("ds-config-without-zero", "distill", ["--deepspeed-config", "{tmp}/ds.json"], "--deepspeed-config needs --zero 1, 2 or 3"),
    # checkpoints (--out {run} holds a finished tiny run)
    Case("resume-all-truncated", "distill", ["--resume", "--iterations", "6"], "step_00000004.pt: unreadable or truncated",
         prepare=lambda tmp: [_truncate(f"run/checkpoints/step_0000000{t}.pt")(tmp) for t in (2, 4)], needs=["run"]),
    Case("resume-boundary-counters", "distill", ["--resume", "--iterations", "6"], "step_00000004.pt: online_engine_counters should be a mapping of numbers",
         prepare=_bad_boundary_checkpoint, needs=["run"]),
    Case("resume-no-checkpoint", "distill", ["--resume", "--iterations", "6"], "holds no checkpoint; nothing was changed",
         prepare=_remove("run/checkpoints"), needs=["run"]),
    Case("resume-other-run", "distill", ["--resume", "--num-pairs", "6"], "made with num_pairs=8, this run has num_pairs=6",
         needs=["run"]),
    Case("auto-resume-files-no-checkpoint", "distill", ["--auto-resume"], "holds no checkpoint; nothing was changed",
         prepare=_remove("run/checkpoints"), needs=["run"]),
    Case("out-exists", "distill", [], "already exists; pass --resume to continue it or --overwrite", needs=["run"]),
    # --config files
    Case("config-unknown-key", "distill", ["--config", "{tmp}/c.json"], "c.json: unknown key 'lr_image'",
         prepare=_write("c.json", b'{"lr_image": 3}')),
    Case("config-malformed", "distill", ["--config", "{tmp}/c.json"], "--config", prepare=_write("c.json", b'{"seed": 1,')),
    Case("config-bad-yaml", "distill", ["--config", "{tmp}/c.yaml"], "not valid YAML", prepare=_write("c.yaml", b"seed: [1, 2")),
    Case("config-unflagged-preset-field", "distill", ["--config", "{tmp}/c.json"], "preset field 'max_words' has no flag",
         prepare=_write("c.json", b'{"preset": {"name": "tiny", "max_words": 3}}')),
    Case("config-missing-file", "distill", ["--config", "{tmp}/none.json"], "none.json: cannot read it"),
]  # fmt: skip

EVAL_CASES = [
    Case("eval-config-unknown-key", "eval", ["--config", "{tmp}/e.json"], "e.json: unknown key 'epoch'",
         prepare=_write("e.json", b'{"epoch": 3}')),
    Case("eval-nothing-to-evaluate", "eval", [], "give exactly one of --synthetic, --coreset, --compare"),
    Case("eval-image-encoder-kwargs-call", "eval", ["--coreset", "random", "--image-encoder-kwargs", "patch_size=f(1)"],
         "--image-encoder-kwargs: the value of 'patch_size' must be a number, word, string, tuple or list"),
    Case("eval-image-encoder-kwargs-twice", "eval", ["--coreset", "random", "--image-encoder-kwargs", "depth=2,depth=3"],
         "--image-encoder-kwargs sets 'depth' twice"),
    Case("eval-runs-zero", "eval", ["--coreset", "random", "--runs", "0"], "--runs must be >= 1, got 0"),
    Case("eval-epochs-zero", "eval", ["--coreset", "random", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    Case("eval-batch-one", "eval", ["--coreset", "random", "--batch-size", "1"], "--batch-size must be >= 2"),
    Case("eval-lr-nan", "eval", ["--coreset", "random", "--lr-encoder", "nan"], "--lr-encoder must be a finite number"),
    Case("eval-lr-proj-negative", "eval", ["--coreset", "random", "--lr-proj", "-1"], "--lr-proj must be >= 0.0"),
    Case("eval-num-pairs-one", "eval", ["--coreset", "random", "--num-pairs", "1"], "--num-pairs must be >= 2, got 1"),
    Case("eval-seed-negative", "eval", ["--coreset", "random", "--seed", "-2"], "--seed must be >= 0, got -2"),
    Case("eval-select-on-val-val", "eval", ["--coreset", "random", "--split", "val", "--select-on-val"], "would select and score on the same split"),
    Case("eval-results-exist", "eval", ["--coreset", "random", "--out", "{result}"], "already holds results.json; pass --overwrite",
         needs=["result"]),
    Case("eval-data-corrupt-test-image", "eval", ["--coreset", "random", "--num-pairs", "4", "--dataset", "karpathy",
                                                  "--ann-root", "{ann}", "--image-root", "{images}"],
         "1201.jpg: unreadable or corrupt image", prepare=_write("data/images/flickr30k-images/1201.jpg", b"junk"),
         needs=["karpathy"]),
    Case("eval-data-val-caption-type", "eval", ["--coreset", "random", "--num-pairs", "4", "--split", "val", "--dataset", "karpathy",
                                                "--ann-root", "{ann}", "--image-root", "{images}"],
         "flickr30k_val.json: entry 1 field 'caption' must be a non-empty list",
         prepare=_karpathy("flickr30k_val.json", lambda d: d[:1] + [{**d[1], "caption": []}] + d[2:]), needs=["karpathy"]),
    # synthetic sets
    Case("set-missing-dir", "eval", ["--synthetic", "{tmp}/none"], "empty or missing directory"),
    Case("set-missing-tensors", "eval", ["--synthetic", "{set}"], "synthetic.safetensors: missing",
         prepare=_remove("run/synthetic.safetensors"), needs=["run"]),
    Case("set-truncated", "eval", ["--synthetic", "{set}"], "synthetic.safetensors: unreadable or truncated safetensors file",
         prepare=_truncate("run/synthetic.safetensors"), needs=["run"]),
    Case("set-metadata-malformed", "eval", ["--synthetic", "{set}"], "synthetic.json: malformed JSON",
         prepare=_write("run/synthetic.json", b"{not json"), needs=["run"]),
    Case("set-metadata-disagrees", "eval", ["--synthetic", "{set}"], "field 'num_pairs' says 9 but the tensors have 8",
         prepare=lambda tmp: _edit_json(tmp / "run" / "synthetic.json", lambda d: {**d, "num_pairs": 9}), needs=["run"]),
    Case("set-other-image-size", "eval", ["--synthetic", "{set}", "--preset", "demo"], "made for image_size=16, but this run uses image_size=32",
         needs=["run"]),
    Case("set-nan", "eval", ["--synthetic", "{set}"], "synthetic images contain NaN or inf values",
         prepare=_set_nan_tensor, needs=["run"]),
    # result folders for --compare
    Case("compare-no-results", "eval", ["--compare", "{tmp}"], "no results.json"),
    Case("compare-malformed", "eval", ["--compare", "{result}"], "results.json: malformed JSON",
         prepare=_write("result/results.json", b"[1, 2"), needs=["result"]),
    Case("compare-missing-field", "eval", ["--compare", "{result}"], "results.json: field 'summary' is missing",
         prepare=lambda tmp: _edit_json(tmp / "result" / "results.json", lambda d: {k: v for k, v in d.items() if k != "summary"}),
         needs=["result"]),
    Case("compare-missing-metric", "eval", ["--compare", "{result}"], "field 'summary.t2i_R@5' is missing",
         prepare=lambda tmp: _edit_json(tmp / "result" / "results.json",
                                        lambda d: {**d, "summary": {k: v for k, v in d["summary"].items() if k != "t2i_R@5"}}),
         needs=["result"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    argv = ["--preset", "tiny", "--out", str(out), "--iterations", "4", "--save-every", "2", "--no-progress"]
    assert distill_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def finished_result(tmp_path_factory, finished_run) -> Path:
    out = tmp_path_factory.mktemp("finished") / "result"
    assert eval_main(["--preset", "tiny", "--no-progress", "--synthetic", str(finished_run), "--out", str(out)]) == 0
    return out


def _snapshot(root: Path) -> Dict[str, tuple]:
    """Every file and folder under ``root`` with its bytes and modification time."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = ("dir",) if path.is_dir() else (path.read_bytes(), path.stat().st_mtime_ns)
    return out


def _copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


@pytest.mark.parametrize("case", DISTILL_CASES + EVAL_CASES, ids=lambda c: f"{c.command}-{c.id}")
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, request, monkeypatch):
    for package in {"deepspeed", "datasets"} & set(case.needs):
        pytest.importorskip(package)
    for package in case.missing:
        monkeypatch.setitem(sys.modules, package, None)  # import fails, find_spec finds nothing
    if "karpathy" in case.needs:
        make_karpathy_fixture(tmp_path / "data")
    if "run" in case.needs:
        _copy(request.getfixturevalue("finished_run"), tmp_path / "run")
    if "result" in case.needs:
        _copy(request.getfixturevalue("finished_result"), tmp_path / "result")
    if case.prepare is not None:
        case.prepare(tmp_path)
    fill = {
        "tmp": tmp_path,
        "ann": tmp_path / "data" / "annotations",
        "images": tmp_path / "data" / "images",
        "set": tmp_path / "run",
        "result": tmp_path / "result",
    }
    argv = [a.format(**fill) for a in case.argv]
    before = _snapshot(tmp_path)
    capsys.readouterr()  # what the fixtures printed
    if case.command == "distill":
        out = str(tmp_path / "run") if "run" in case.needs else str(tmp_path / "new-run")
        full = ["--preset", "tiny", "--device", "cpu", "--no-progress", "--out", out, *argv]
        entry = distill_main
    else:
        full = ["--preset", "tiny", "--device", "cpu", "--no-progress"]
        if "--out" not in argv:
            full += ["--out", str(tmp_path / "new-eval")]
        if "--preset" in argv:
            full = full[2:]
        full += argv
        entry = eval_main
    try:
        code = entry(full)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and case.message in err[0], err
    assert "Traceback" not in err[0]
    assert _snapshot(tmp_path) == before, "bad input changed files"


def test_there_are_at_least_40_classes_of_bad_input():
    assert len(DISTILL_CASES + EVAL_CASES) >= 40


# ---------------------------------------------------------------------------------------------- the loss API


def _features(n: int = 4, d: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, d, dtype=dtype)


API_CASES = [
    ("not-a-tensor", lambda: covmatch_loss([[1.0]], _features(), _features(), _features()), TypeError, "real_img must be a torch.Tensor"),
    ("integer-dtype", lambda: covmatch_loss(torch.ones(4, 3, dtype=torch.long), _features(), _features(), _features()), TypeError, "floating-point tensor"),
    ("not-2d", lambda: covmatch_loss(torch.randn(4, 3, 2), _features(), _features(), _features()), ValueError, "must be 2-D"),
    ("one-row", lambda: covmatch_loss(_features(1), _features(1), _features(), _features()), ValueError, "needs at least 2"),
    ("rows-differ", lambda: covmatch_loss(_features(4), _features(5), _features(), _features()), ValueError, "same number of rows"),
    ("dims-differ", lambda: covmatch_loss(_features(d=3), _features(), _features(d=5), _features()), ValueError, "image feature dims differ"),
    ("rho-nan", lambda: covmatch_loss(_features(), _features(), _features(), _features(), rho=float("nan")), ValueError, "rho must be finite"),
    ("rho-zero", lambda: covmatch_loss(_features(), _features(), _features(), _features(), rho=0.0), ValueError, "rho must be > 0"),
    ("lam-negative", lambda: covmatch_loss(_features(), _features(), _features(), _features(), lam=-1.0), ValueError, "lam must be >= 0"),
    ("lam-string", lambda: covmatch_loss(_features(), _features(), _features(), _features(), lam="0.1"), TypeError, "lam must be a real number"),
    ("backend-unknown", lambda: covmatch_loss(_features(), _features(), _features(), _features(), backend="cuda"), ValueError, "backend must be one of"),
    ("cross-covariance-rows", lambda: cross_covariance(_features(4), _features(3)), ValueError, "same number of rows"),
    ("mean-loss-dims", lambda: mean_matching_loss(_features(d=3), _features(d=4)), ValueError, "same feature dim"),
]  # fmt: skip


@pytest.mark.parametrize("call,error,message", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_loss_api_rejects_bad_input(call, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()
