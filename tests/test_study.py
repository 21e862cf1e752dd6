"""The embedded study's runner and report (experiments/embedded_study), on stand-in jobs that
finish in milliseconds: order, resumption, failure handling, and the numbers of the report."""

from __future__ import annotations

import json
import sys

import pytest

from covmatch.analyze import build_parser as analyze_parser
from covmatch.distill.cli import build_parser as distill_parser
from covmatch.distill.cli import config_from_args
from covmatch.eval.cli import build_parser as eval_parser
from experiments.embedded_study import design, runner
from experiments.embedded_study import jobs as study_jobs
from experiments.embedded_study.report import METRICS, mean_std, write_report


@pytest.fixture()
def root(tmp_path, monkeypatch):
    monkeypatch.setattr(study_jobs, "ROOT", tmp_path)
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.05)  # stand-in jobs finish in a fraction of a second
    return tmp_path


class FakeDistill(study_jobs.Distill):
    fail = False

    def command(self):
        meta = json.dumps({"iteration": self.iterations})
        code = f"import pathlib, sys; p = pathlib.Path({str(self.out)!r}); p.mkdir(parents=True, exist_ok=True); "
        code += f"(p / 'synthetic.safetensors').write_bytes(b''); (p / 'synthetic.json').write_text({meta!r}); "
        code += f"sys.exit({int(self.fail)})"
        return [sys.executable, "-c", code]


class FailingDistill(FakeDistill):
    fail = True


class FakeEvaluate(study_jobs.Evaluate):
    def command(self):
        value = 20.0 + self.seed + (5.0 if "paper" in self.source and "initial" not in self.source else 0.0)
        run = {m: value for m in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean")}
        text = json.dumps({"runs": [run]})
        code = f"import pathlib; p = pathlib.Path({str(self.out)!r}); p.mkdir(parents=True, exist_ok=True); "
        code += f"(p / 'results.json').write_text({text!r})"
        return [sys.executable, "-c", code]


def _fake_jobs(distill_cls=FakeDistill):
    run = distill_cls("paper-s0", (), 0, 10)
    evals = [FakeEvaluate(f"e{s}", run.name, "test", s) for s in (0, 1, 2)]
    initial = [FakeEvaluate(f"i{s}", f"{run.name}/initial", "test", s) for s in (0, 1, 2)]
    baseline = [FakeEvaluate(f"r{s}", "random", "test", s) for s in (0, 1)]
    return run, evals, initial, baseline


def test_runner_orders_by_dependency_and_reuses_finished_jobs(root):
    run, evals, initial, baseline = _fake_jobs()
    jobs = evals + initial + baseline + [run]  # the distillation last: evaluations must wait for it
    assert runner.run_jobs(jobs, lanes=2) == 0
    assert all(j.done() for j in jobs)
    order = [json.loads(line)["job"] for line in (root / "jobs.jsonl").read_text().splitlines()]
    assert sorted(order) == sorted(j.name for j in jobs)
    assert order.index(run.name) < min(order.index(e.name) for e in evals + initial)
    assert runner.run_jobs(jobs, lanes=2) == 0  # all done: nothing runs again
    assert len((root / "jobs.jsonl").read_text().splitlines()) == len(jobs)


def test_runner_skips_what_a_failed_distillation_would_feed(root):
    run, evals, _, baseline = _fake_jobs(FailingDistill)
    assert runner.run_jobs([run, *evals, *baseline], lanes=2) == 1
    assert not any(e.done() for e in evals)
    assert all(b.done() for b in baseline)


def test_runner_starts_nothing_past_its_deadline(root):
    _, _, _, baseline = _fake_jobs()
    assert runner.run_jobs(baseline, lanes=1, hours=1e-9) == 0
    assert not any(b.done() for b in baseline)


def test_report_means_spreads_and_paired_differences(root):
    run, evals, initial, baseline = _fake_jobs()
    runner.run_jobs([run, *evals, *initial[:2], *baseline], lanes=2)  # one iteration-0 run left undone
    table = design.Table(
        "1", "Table 1: test", "question?",
        [("CovMatch, paper regime", evals), ("its iteration-0 sets", initial), ("random pairs", baseline)],
        paired=[("paper - initial", evals, initial)],
    )  # fmt: skip
    md = write_report([table], {run.name: 60.0}, "lr3").read_text()
    assert "| CovMatch, paper regime | 26.0 ± 1.0 |" in md  # 25, 26, 27
    assert "its iteration-0 sets (2 of 3 runs)" in md
    assert "| paper - initial | +5.0 ± 0.0 | +5.0, +5.0 |" in md  # paired by evaluation seed
    assert "chosen: **lr3**" in md
    assert "pending" in md  # the targets that need rows this table lacks
    data = json.loads((root / "study.json").read_text())
    assert data["tables"]["1"]["rows"][0]["done"] == 3
    assert (root / "table-1.png").is_file()


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([4.0]) == (4.0, 0.0)


def test_every_planned_command_is_accepted_by_the_commands_it_runs(root, monkeypatch):
    """The tune and final stages' commands parse (the final stage planned as if lr3 had won)."""
    monkeypatch.setattr(design, "choose_config", lambda: "lr3")
    monkeypatch.setattr(design, "choose_unseen_lr", lambda enc: design.UNSEEN_LR_CANDIDATES["lr.01"])
    monkeypatch.setattr(design, "balanced_init_wins", lambda chosen: True)  # table 1's added rows planned too
    monkeypatch.setattr(design, "scaling_variant_wins", lambda chosen, v, n: True)  # and table 6's variant rows
    monkeypatch.setattr(design, "dsa_candidate_wins", lambda chosen: "dsa-lr10")  # and table 8
    jobs = design.job_list("all")
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    # a name is one job: two tables that share a run name the same command (the runner reuses it by name)
    commands = {}
    for table in design.all_tables("all"):
        for job in table.jobs():
            assert commands.setdefault(job.name, job.command()) == job.command(), job.name
    assert any("--num-pairs 500" in " ".join(c) for n, c in commands.items() if n.startswith("random"))
    seen = set()
    for job in jobs:
        assert set(job.requires()) <= seen, job.name  # a distillation precedes what reads it
        seen.add(job.name)
        argv = job.command()[3:]  # past "python -m covmatch.x"
        if isinstance(job, study_jobs.Distill):
            config_from_args(distill_parser().parse_args(argv)).preset.check()
        elif isinstance(job, study_jobs.Analyze):
            analyze_parser().parse_args(argv)
        elif isinstance(job, study_jobs.Hybrid):
            assert job.command()[1:3] == ["-m", "experiments.embedded_study.hybrid_set"] and len(argv) == 6
        else:
            eval_parser().parse_args(argv)
    keys = {t.key for t in design.all_tables("all")}
    tune_keys = {
        "tune",
        "tune-unseen",
        "tune-init",
        "tune-scaling-rho",
        "tune-scaling-batch",
        "tune-scaling-iterations",
        "tune-dsa",
        "tune-modality",
    }
    assert keys == tune_keys | {"1", "1m", "2", "3", "4", "5", "5t", "6", "7", "8"}
    distills = [j for j in jobs if isinstance(j, study_jobs.Distill)]
    assert any("--init" in j.command() for j in distills if j.name.startswith("paper"))
    assert {"paper-rho2-n500-t500-s1", "paper-sbatch-n500-t500-s1"} <= set(names)  # table 6's variant rows: every seed
    # --tables runs tables in the order given: table 7's first job before table 1's
    ordered = [j.name for j in design.job_list("final", ["7", "1"])]
    assert ordered[0] == "paper-n100-t1000-s0" and ordered[1].endswith(".probe.test.r0")
    assert not any(".text6." in n for n in ordered)


def _write_result(root, name: str, mean: float) -> None:
    (root / "evals" / name).mkdir(parents=True)
    (root / "evals" / name / "results.json").write_text(json.dumps({"runs": [{"mean": mean}]}))


def test_a_set_without_its_tensors_is_redistilled_only_for_evaluations_still_to_run(root, monkeypatch):
    monkeypatch.setattr(design, "choose_config", lambda: "lr3")
    monkeypatch.setattr(design, "choose_unseen_lr", lambda enc: None)
    run = design.all_distills()["paper-n500-t500-s0"]
    run.out.mkdir(parents=True)
    (run.out / "synthetic.json").write_text(json.dumps({"iteration": run.iterations}))  # tensors not committed
    assert not run.done()
    assert run in design.job_list("final", ["6"])
    # the clone's record is distilled over from scratch
    assert "--overwrite" in run.command() and "--auto-resume" not in run.command()
    (run.out / "checkpoints").mkdir()
    (run.out / "checkpoints" / "step-100.pt").write_bytes(b"")  # a rerun cut short here resumes instead
    assert "--auto-resume" in run.command() and "--overwrite" not in run.command()
    for job in {j.name: j for t in design.all_tables("all") for j in t.jobs() if run.name in j.requires()}.values():
        job.out.mkdir(parents=True)  # every evaluation and analysis of the set is finished
        (job.out / ("results.json" if isinstance(job, study_jobs.Evaluate) else "analysis.json")).write_text("{}")
    assert run not in design.job_list("final", ["6"])
    (run.out / "synthetic.safetensors").write_bytes(b"")
    assert run.done()


def test_unseen_encoder_enters_table_5_only_if_random_pairs_learn_on_val(root):
    for enc, (a, b) in {"resnet": (30.0, 34.0), "vit-p8": (4.0, 5.0)}.items():
        for lr, mean in zip(design.UNSEEN_LR_CANDIDATES, (a, b)):
            for seed in design.TUNE_EVAL_SEEDS:
                _write_result(root, f"random.{enc}-{lr}.val.r{seed}", mean)
    assert design.choose_unseen_lr("resnet") == design.UNSEEN_LR_CANDIDATES["lr.001"]  # the better val mean
    assert design.choose_unseen_lr("vit-p8") is None  # learns at neither rate: below LEARNS_ON_VAL
    assert design.choose_unseen_lr("convnext-p2") is None  # not scored yet


def test_balanced_init_gate_reads_val_only(root):
    assert design.balanced_init_wins("slow-lr3") is None
    table = design.tune_init_table("slow-lr3")
    rows = dict(table.rows)
    for e in rows["slow-lr3, class-balanced initial pairs"]:
        _write_result(root, e.name, 30.0)
    for e in rows["class-balanced random pairs"]:
        _write_result(root, e.name, 31.0)
    assert all(e.split == "val" for e in rows["class-balanced random pairs"])
    assert design.balanced_init_wins("slow-lr3") is False


@pytest.mark.parametrize(
    "key, tried, default, flags",
    [("rho", {200: "rho 2", 500: "rho 2"}, "rho 1", {200: "--rho 2", 500: "--rho 2"}),
     ("batch", {200: "synthetic batch 200", 500: "synthetic batch 256"}, "synthetic batch 100",
      {200: "--syn-batch 200", 500: "--syn-batch 256"})],
)  # fmt: skip
def test_scaling_variant_gate_reads_val_only_and_adds_table_6_rows_where_it_wins(
    root, monkeypatch, key, tried, default, flags
):
    monkeypatch.setattr(design, "choose_config", lambda: "lr3")
    monkeypatch.setattr(design, "choose_unseen_lr", lambda enc: None)
    variant = design.SCALING_VARIANTS[key]
    assert design.scaling_variant_wins("lr3", variant, 500) is None
    table = design.tune_scaling_table("lr3", variant)
    assert table.key == f"tune-scaling-{key}"
    rows = dict(table.rows)
    assert all(e.split == "val" for evals in rows.values() for e in evals)
    for n, (a, b) in {200: (30.0, 31.0), 500: (45.0, 41.0)}.items():
        for e in rows[f"N {n}: {tried[n]}"]:
            _write_result(root, e.name, a)
        for e in rows[f"N {n}: {default} (default, table 6)"]:
            _write_result(root, e.name, b)
    assert design.scaling_variant_wins("lr3", variant, 200) is False
    assert design.scaling_variant_wins("lr3", variant, 500) is True
    t6 = next(t for t in design.final_tables("lr3") if t.key == "6")
    labels = [label for label, _ in t6.rows]
    assert f"N 500: CovMatch at {tried[500]}" in labels and f"N 200: CovMatch at {tried[200]}" not in labels
    varied_rows = dict(t6.rows)[f"N 500: CovMatch at {tried[500]}"]
    assert {e.split for e in varied_rows} == {"test"} and len(varied_rows) == 6  # 2 distillation seeds x 3 runs
    paired = {label: (a, b) for label, a, b in t6.paired}
    assert f"N 500: {tried[500]} - {default} (seed 1)" in paired
    (distilled,), (initial,) = paired[f"N 500: CovMatch at {tried[500]} - iteration-0 (seed 1)"]
    assert distilled.source == f"{variant.set_name}-n500-t500-s1"  # the same pairs at iteration 0 as table 6's set
    assert initial.source == "paper-n500-t500-s1/initial" and initial.seed == distilled.seed
    distills = design.all_distills()
    assert flags[500] in " ".join(distills[f"{variant.set_name}-n500-t500-s1"].command())
    assert flags[200] in " ".join(distills[f"{variant.set_name}-n200-t500-s0"].command())
    # the study's other sets keep the synthetic batch of 100 they ran with, whatever the demo preset's default
    assert "--syn-batch 100" in " ".join(distills["paper-n500-t500-s1"].command())
    for name in (f"{variant.set_name}-n500-t500-s1", "paper-n500-t500-s1"):
        assert distills[name].command().count("--syn-batch") == 1
    for evals in rows.values():  # the report reads every recall metric of a run
        for e in evals:
            path = e.out / "results.json"
            if path.is_file():
                mean = json.loads(path.read_text())["runs"][0]["mean"]
                path.write_text(json.dumps({"runs": [{m: mean for m in METRICS}]}))
    md = write_report([table], {}, "lr3").read_text()
    assert (f"- Tune-scaling-{key} (val), N 500: {tried[500]} 45.0 vs the default {default} 41.0: above, so table 6 "
            f"has its test rows.") in md  # fmt: skip
    assert f"N 200: {tried[200]} 30.0 vs the default {default} 31.0: not above, so not run on test." in md
    t6_rows = dict(t6.rows)
    for label, mean in {"N 100: CovMatch": 30.0, "N 100: random pairs": 25.0, "N 500: random pairs": 48.0,
                        f"N 500: CovMatch at {tried[500]}": 54.0}.items():  # fmt: skip
        for e in t6_rows[label]:
            (root / "evals" / e.name).mkdir(parents=True, exist_ok=True)
            (root / "evals" / e.name / "results.json").write_text(json.dumps({"runs": [{m: mean for m in METRICS}]}))
    md = write_report([t6], {}, "lr3").read_text()
    assert (f"- Table 6 at {tried[500]} for N 500 (chosen on val), the gap to random does not shrink from N 100 to "
            f"500: **holds** (+5.0 -> +6.0).") in md  # fmt: skip


def test_longer_table_compares_iterations_at_the_paper_batch_on_val(root, monkeypatch):
    monkeypatch.setattr(design, "choose_config", lambda: "lr3")
    table = design.tune_longer_table("lr3")
    assert table.key == "tune-scaling-iterations" and table in design.all_tables("tune")
    rows = dict(table.rows)
    assert all(e.split == "val" and e.num_pairs == 500 for evals in rows.values() for e in evals)
    longer, shorter = (
        rows["N 500: synthetic batch 256, 1000 it."],
        rows["N 500: synthetic batch 256, 500 it. (tune-scaling-batch)"],
    )
    assert {e.source for e in longer} == {"paper-sbatch-n500-t1000-s0"}
    # the 500-iteration run and the starting pairs are tune-scaling-batch's own evaluations, reused
    batch_table = dict(design.tune_scaling_table("lr3", design.SCALING_VARIANTS["batch"]).rows)
    assert [e.name for e in shorter] == [e.name for e in batch_table["N 500: synthetic batch 256"]]
    assert [e.name for e in rows["N 500: iteration-0 set"]] == [e.name for e in batch_table["N 500: iteration-0 set"]]
    command = " ".join(design.all_distills()["paper-sbatch-n500-t1000-s0"].command())
    assert "--iterations 1000" in command and "--syn-batch 256" in command
    for label, mean in (("N 500: synthetic batch 256, 1000 it.", 52.0), ("N 500: synthetic batch 256, 500 it.", 50.0)):
        for e in rows[next(k for k in rows if k.startswith(label))]:
            (root / "evals" / e.name).mkdir(parents=True)
            (root / "evals" / e.name / "results.json").write_text(json.dumps({"runs": [{m: mean for m in METRICS}]}))
    md = write_report([table], {}, "lr3").read_text()
    assert (
        "- Tune-scaling-iterations (val), N 500 at synthetic batch 256: 1000 it. 52.0 vs 500 it. 50.0: above, "
        "so a later table 6 gets its test rows."
    ) in md


def test_table_4_target_needs_the_paper_setting_above_every_other_beyond_the_spread(root):
    run, evals, _, _ = _fake_jobs()
    lam0 = [FakeEvaluate(f"l{s}", "lam0-set", "test", s) for s in (0, 1, 2)]  # 20, 21, 22 against 25, 26, 27
    assert runner.run_jobs([run, *evals, *lam0], lanes=2, cores=[0, 0]) == 0  # both lanes on core 0
    table = design.Table("4", "Table 4: lam and rho", "?", [("lam 0", lam0), ("lam 0.1 (paper), rho 2 (paper)", evals)])
    md = write_report([table], {}, "lr3").read_text()
    assert "- Table 4, the paper's lam 0.1 and rho 2 above every other setting beyond the spread: **holds** " in md
    assert "(26.0 vs lam 0 21.0)" in md


def _write_analysis(root, source, final_match):
    start = {"cov_error": 1.0, "image_mean_gap": 0.01, "text_mean_gap": 0.01}
    match = {"iteration 0": start, "iteration 5": final_match}
    result = {"feature_stability": {"image": [1.0, 0.98], "text": [1.0, 0.95]}, "match": {"test_nfnet": match},
              "movement": {"pixel_relative_distance": {"mean": 0.02}, "token_relative_distance": {"mean": 0.175},
                           "changed_token_share": 0.0}}  # fmt: skip
    out = root / "analysis" / source
    out.mkdir(parents=True)
    (out / "analysis.json").write_text(json.dumps(result))


def test_report_diagnosis_decomposes_the_covariance_scale_where_the_analysis_has_it(root):
    final = {"cov_error": 0.25, "image_mean_gap": 0.02, "text_mean_gap": 0.05}
    _write_analysis(root, "old-s0", final)
    _write_analysis(root, "new-s0", {**final, "cov_scale": 0.5, "image_spread": 1.0, "text_spread": 0.625,
                                     "coupling": 0.8})  # fmt: skip
    analyses = [("old", study_jobs.Analyze("old-s0")), ("new", study_jobs.Analyze("new-s0"))]
    table = design.Table("4", "Table 4", "question?", [], analyses=analyses)
    md = write_report([table], {}, None).read_text()
    common = "0.980 / 0.950 | 1.000 → 0.250 (test_nfnet) | – | 0.0200 / 0.0500"
    assert f"| new | {common} | 0.50 = 1.00 × 0.62 × 0.80 | 0.020 | 0.175 | 0.0% |" in md
    assert f"| old | {common} | – |" in md


def test_report_shows_how_well_a_fresh_model_fits_each_set(root):
    history = [{"epoch": k, "train_loss": 4.6 - 0.04 * k} for k in range(1, 101)]
    result = {"runs": [{"mean": 12.5}], "num_pairs": 100, "histories": [history],
              "config": {"settings": {"batch_size": 100}}}  # fmt: skip
    fitted = study_jobs.Evaluate("fit.val.r0", "paper-s0", "val", 0)
    old = study_jobs.Evaluate("old.val.r0", "old-s0", "val", 0)
    for job, data in ((fitted, result), (old, {**result, "histories": None})):
        job.out.mkdir(parents=True)
        (job.out / "results.json").write_text(json.dumps(data))
    table = design.Table("4", "Table 4: rho", "question?", [], curves=[("fitted", fitted), ("old", old)])
    assert fitted in table.jobs() and old in table.jobs()
    md = write_report([table], {}, None).read_text()
    assert "chance is ln 100 = 4.61" in md
    assert "| fitted | 4.56 | 4.40 | 4.20 | 3.60 | 2.60 | 0.60 | 12.5 |" in md
    assert "| old |" not in md  # a run written before histories were kept has no curve to show
    assert (root / "table-4-fit.png").is_file()


def test_report_summarises_each_paired_comparison_over_its_seeds(root):
    runs = [FakeDistill(f"paper-s{s}", (), s, 10) for s in (0, 1)]
    evals = {r.name: [FakeEvaluate(f"{r.name}.e{k}", r.name, "test", k) for k in (0, 1)] for r in runs}
    initial = {r.name: [FakeEvaluate(f"{r.name}.i{k}", f"{r.name}/initial", "test", k) for k in (0, 1)] for r in runs}
    baseline = [FakeEvaluate(f"r{k}", "random", "test", k) for k in (0, 1)]
    jobs = runs + [e for v in (*evals.values(), *initial.values()) for e in v] + baseline
    assert runner.run_jobs(jobs, lanes=2) == 0
    paired = [(f"paper - initial (seed {r.seed})", evals[r.name], initial[r.name]) for r in runs]
    paired += [(f"paper - random, seed {r.seed}", evals[r.name], baseline) for r in runs]
    table = design.Table("1", "Table 1: test", "question?", [], paired=paired)
    md = write_report([table], {}, None).read_text()
    assert "- paper - initial, all seeds: +5.0 ± 0.0 over 4 pairs." in md
    assert "- paper - random, all seeds: +5.0 ± 0.0 over 4 pairs." in md


def test_table_6_pairs_each_diagnosed_set_with_its_own_iteration_0_set(root, monkeypatch):
    """At each diagnosed N, a set's first test run is paired with its iteration-0 set at the same seed."""
    monkeypatch.setattr(design, "choose_config", lambda: "lr3")
    table = next(t for t in design.all_tables("final") if t.key == "6")
    assert [label for label, _, _ in table.paired] == [
        f"N {n}: CovMatch - iteration-0 (seed {s})" for n in design.SCALING_DIAGNOSED_N for s in design.ABLATION_SEEDS
    ]
    for _, (distilled,), (initial,) in table.paired:
        assert initial.source == f"{distilled.source}/initial" and initial.seed == distilled.seed
        assert initial.num_pairs == distilled.num_pairs and "--synthetic" in initial.command()
    analysed = {a.source for _, a in table.analyses}
    assert {distilled.source for label, (distilled,), _ in table.paired if label.endswith("(seed 0)")} <= analysed


def _write_means(root, rows, means) -> None:
    """Every run of the rows named in ``means`` scores that mean recall (all six metrics)."""
    for label, mean in means.items():
        for e in rows[label]:
            (root / "evals" / e.name).mkdir(parents=True, exist_ok=True)
            (root / "evals" / e.name / "results.json").write_text(json.dumps({"runs": [{m: mean for m in METRICS}]}))


def test_dsa_gate_needs_the_unseen_encoder_up_and_the_distilling_one_not_down_on_val(root, monkeypatch):
    monkeypatch.setattr(design, "choose_config", lambda: "lr3")
    monkeypatch.setattr(design, "choose_unseen_lr", lambda enc: design.UNSEEN_LR_CANDIDATES["lr.001"])
    table = design.tune_dsa_table("lr3")
    assert table.key == "tune-dsa" and table in design.all_tables("tune")
    rows = dict(table.rows)
    assert all(e.split == "val" for evals in rows.values() for e in evals)
    # random pairs on the unseen encoder are tune-unseen's runs, reused by name
    assert [e.name for e in rows["resnet: random pairs"]] == [
        "random.resnet-lr.001.val.r0",
        "random.resnet-lr.001.val.r1",
    ]
    # the set without augmentation is the ablations' seed-0 set, and every candidate starts from its pairs
    assert {e.source for e in rows[design.DSA_PLAIN]} == {"paper-n100-t500-s0"}
    distills = design.all_distills()
    assert "--dsa-shift 0.125 --dsa-scale 0.2" in " ".join(distills["paper-dsa-strong-lr10-n100-t500-s0"].command())
    assert design.dsa_candidate_wins("lr3") is None  # nothing scored yet
    plain = {design.DSA_PLAIN: 30.0, f"resnet: {design.DSA_PLAIN}": 33.0}
    scores = {"dsa": (31.0, 33.0), "dsa-lr10": (29.0, 36.0), "dsa-strong-lr10": (30.0, 35.0),
              "dsa-strong-lr30": (26.0, 34.0)}  # fmt: skip
    assert set(scores) == set(design.DSA_CANDIDATES)
    means = {**plain, "iteration-0 set": 24.0, "resnet: iteration-0 set": 33.5, "random pairs": 25.0,
             "resnet: random pairs": 34.0}  # fmt: skip
    for label, (distilling, unseen) in scores.items():
        means.update({label: distilling, f"resnet: {label}": unseen})
    _write_means(root, rows, means)
    # dsa: not above on the unseen encoder; dsa-lr10: up there but down on the distilling one; strong: both
    assert design.dsa_candidate_wins("lr3") == "dsa-strong-lr10"
    md = write_report([table], {}, "lr3").read_text()
    assert (
        "- Tune-dsa (val), dsa: resnet 33.0 vs 33.0 without augmentation, distilling encoder 31.0 vs 30.0: "
        "does not win." in md
    )
    assert (
        "- Tune-dsa (val), dsa-strong-lr10: resnet 35.0 vs 33.0 without augmentation, distilling encoder 30.0 "
        "vs 30.0: wins." in md
    )
    assert "| resnet: dsa-strong-lr10 - iteration-0 | +1.5 ± 0.0 |" in md
    t8 = design.dsa_table("lr3", "dsa-strong-lr10")
    assert t8 in design.all_tables("final")
    t8_rows = dict(t8.rows)
    assert {e.split for evals in t8_rows.values() for e in evals} == {"test"}
    assert len(t8_rows["vit-p8: CovMatch with dsa-strong-lr10"]) == 9  # 3 distillation seeds x 3 runs
    assert not any(label.startswith("text6") for label in t8_rows)  # image encoders only
    paired = {label: (a, b) for label, a, b in t8.paired}
    a, b = paired["resnet: with dsa-strong-lr10 - iteration-0 (seed 2)"]
    assert b[0].source == "paper-n100-t1000-s2/initial" and [e.seed for e in a] == [e.seed for e in b]
    a, b = paired["efficientnet-os8: with dsa-strong-lr10 - without (seed 1)"]
    assert a[0].source == "paper-dsa-strong-lr10-n100-t1000-s1" and b[0].source == "paper-n100-t1000-s1"
    assert "efficientnet-os8: with dsa-strong-lr10 - iteration-0 (seed 1)" not in paired  # never scored there


def test_modality_table_scores_both_hybrids_of_a_set_with_its_starting_pairs(root, monkeypatch):
    monkeypatch.setattr(design, "choose_config", lambda: "lr3")
    monkeypatch.setattr(design, "choose_unseen_lr", lambda enc: design.UNSEEN_LR_CANDIDATES["lr.001"])
    table = design.tune_modality_table("lr3")
    assert table in design.all_tables("tune")
    rows = dict(table.rows)
    images_only = rows["distilled images, starting captions"][0].source
    made = design.all_distills()[images_only]
    assert isinstance(made, study_jobs.Hybrid) and made.requires() == ("paper-n100-t500-s0",)
    command = " ".join(made.command())
    assert f"--images {root}/sets/paper-n100-t500-s0 --captions {root}/sets/paper-n100-t500-s0/initial" in command
    # the hybrid is made before its evaluations, after the set it is made from
    names = [j.name for j in design.job_list("tune", ["tune"])]
    assert names.index("paper-n100-t500-s0") < names.index(images_only) < names.index(f"{images_only}.default.val.r0")
    assert [e.name for e in rows["iteration-0 set"]] == [e.name for e in dict(design.tune_dsa_table("lr3").rows)[
        "iteration-0 set"]]  # fmt: skip
    # the images distilled alone: captions held, the image step as the row says (the last --lr-img is the one used)
    source = rows["images distilled alone, lr_img 30"][0].source
    argv = design.all_distills()[source].command()[3:]
    config = config_from_args(distill_parser().parse_args(argv))
    assert config.distill_mode == "images" and config.preset.lr_img == 30.0


def test_table_1m_pairs_each_hybrid_of_table_1_with_its_own_starting_pairs_on_test(root, monkeypatch):
    monkeypatch.setattr(design, "choose_config", lambda: "lr3")
    monkeypatch.setattr(design, "choose_unseen_lr", lambda enc: design.UNSEEN_LR_CANDIDATES["lr.001"])
    t1m = next(t for t in design.final_tables("lr3") if t.key == "1m")
    rows = dict(t1m.rows)
    assert {e.split for evals in rows.values() for e in evals} == {"test"}
    assert len(rows["resnet: starting images, distilled captions"]) == 9  # 3 distillation seeds x 3 runs
    # the starting pairs on each encoder are the runs tables 1 and 5 already scored
    t1 = dict(next(t for t in design.final_tables("lr3") if t.key == "1").rows)
    assert [e.name for e in rows["iteration-0 sets"]] == [e.name for e in t1["its iteration-0 sets"]]
    assert rows["resnet: iteration-0 sets"][0].name == "paper-n100-t1000-s0-initial.resnet.test.r0"
    paired = {label: (a, b) for label, a, b in t1m.paired}
    a, b = paired["resnet: starting images, distilled captions - iteration-0 (seed 2)"]
    assert a[0].source == "hybrid-images-paper-n100-t1000-s2-initial-captions-paper-n100-t1000-s2"
    assert b[0].source == "paper-n100-t1000-s2/initial" and [e.seed for e in a] == [e.seed for e in b]


def test_regenerate_lists_every_set_without_tensors_after_the_sets_it_is_made_from(root, monkeypatch):
    from experiments.embedded_study.__main__ import sets_to_regenerate

    monkeypatch.setattr(design, "choose_config", lambda: "lr3")
    monkeypatch.setattr(design, "choose_unseen_lr", lambda enc: None)
    todo = sets_to_regenerate()
    names = [job.name for job in todo]
    assert set(names) == set(design.all_distills()) and len(names) == len(set(names))  # nothing here: all of them
    for job in todo:
        assert all(names.index(dep) < names.index(job.name) for dep in job.requires()), job.name
    done = todo[0]
    done.out.mkdir(parents=True)
    (done.out / "synthetic.safetensors").write_bytes(b"")
    (done.out / "synthetic.json").write_text(json.dumps({"iteration": done.iterations}))
    assert done.name not in [job.name for job in sets_to_regenerate()]
