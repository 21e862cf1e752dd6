"""Run by ``torchrun --nproc_per_node 2`` from ``test_distributed.py``; each scenario asserts on every rank.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py SCENARIO [ARGS]

``loss``: the all-reduced loss and gradients on 2 shards equal the single-process ones on their union.
``reset STAGE:PRECISION,...``: after online steps under ZeRO, the reset puts back the pretrained parameters,
the fp32 master copy and an empty optimiser state (a zero-gradient step then changes nothing).
``online-steps`` (one process, no launcher): the online model under ZeRO 1-3 trains as plain PyTorch's does.
``fp16-boundary`` (one process): DeepSpeed's fp16 online model resumes from a reset-boundary checkpoint's state.
``chunked``: with N > the synthetic batch (each rank's batch a sample of its shard), the online model
training and a reset, ``--syn-chunk`` distils the same set as one pass.
``checkpointed``: under ZeRO-3, a run that checkpoints each block equals one that does not.
``compiled [STAGES]`` (one process): under ZeRO-1 and 2 a ``--compile`` run takes the eager run's steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def scenario_loss() -> None:
    from covmatch.distill.distributed import Ranks
    from covmatch.distill.objective import DistillObjective, Features, ShardedObjective

    dist.init_process_group("gloo")
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), dist.get_rank())
    gen = torch.Generator().manual_seed(7)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        # awkward sizes: unequal real and synthetic counts, a mean offset that stresses fp32 sums
        real_img = (torch.randn(2 * 7, 10, generator=gen) + 3.0).to(dtype)
        real_txt = (torch.randn(2 * 7, 6, generator=gen) - 2.0).to(dtype)
        syn_img = (torch.randn(2 * 5, 10, generator=gen) + 2.5).to(dtype)
        syn_txt = (torch.randn(2 * 5, 6, generator=gen) - 1.5).to(dtype)
        torch.manual_seed(0)  # the same projections on every rank
        model = nn.Module()
        model.image_proj = nn.Linear(10, 4).to(dtype)
        model.text_proj = nn.Linear(6, 4).to(dtype)
        r = ranks.rank
        real_shard, syn_shard = slice(7 * r, 7 * (r + 1)), slice(5 * r, 5 * (r + 1))
        for lam in (0.0, 0.1):
            for normalize in (False, True):
                full_img = syn_img.clone().requires_grad_(True)
                full_txt = syn_txt.clone().requires_grad_(True)
                single = DistillObjective(model, Features(real_img, real_txt), rho=2.0, lam=lam, backend="torch")
                if normalize:
                    single.scale = single.covariance_scale()
                expected = single(Features(full_img, full_txt))
                expected[0].backward()

                mine_img = syn_img[syn_shard].clone().requires_grad_(True)
                mine_txt = syn_txt[syn_shard].clone().requires_grad_(True)
                sharded = ShardedObjective(
                    model,
                    Features(real_img[real_shard], real_txt[real_shard]),
                    rho=2.0,
                    lam=lam,
                    ranks=ranks,
                )
                if normalize:  # the union's scale, the same on every rank
                    sharded.scale = sharded.covariance_scale()
                    assert torch.allclose(sharded.scale.double(), single.scale.double(), rtol=tol)
                got = sharded(Features(mine_img, mine_txt))
                got[0].backward()
                for g, e, name in zip(got, expected, ("total", "cov", "mean")):
                    assert torch.allclose(g.double(), e.double(), rtol=tol, atol=tol * 1e-3), (name, dtype, g, e)
                for mine, full in ((mine_img, full_img), (mine_txt, full_txt)):
                    scale = full.grad.abs().max()
                    err = (mine.grad - full.grad[syn_shard]).abs().max() / scale
                    assert err < tol, (dtype, lam, normalize, float(err))
    dist.destroy_process_group()
    print(f"rank {ranks.rank}: sharded loss == single-process loss")


def _persistence_config(threshold: int) -> Path:
    """A DeepSpeed user config setting ZeRO-3's ``stage3_param_persistence_threshold``, in a new directory."""
    import json
    import tempfile

    path = Path(tempfile.mkdtemp()) / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": threshold}}))
    return path


def scenario_reset(cases: str) -> None:
    """``cases``: comma-separated STAGE:PRECISION[:persist], e.g. ``1:fp32,2:bf16,3:fp32:0`` (one engine after
    another; ``persist`` sets ZeRO-3's ``stage3_param_persistence_threshold``, DeepSpeed's default keeps every
    parameter of the tiny model gathered). Two rounds of online steps and a reset; under ZeRO-3 the first reset
    (iteration 0's) gathers one module at a time, later ones copy each rank's own partitions back and gather
    only the heads."""
    from covmatch.distill import DistillConfig, Distiller, online
    from covmatch.distill.distributed import gathered_parameters
    from covmatch.distill.streams import stream_generator
    from covmatch.presets import get_preset

    gathered_counts = []
    gather = online.gathered_parameters

    def counting_gather(params, **kwargs):
        params = list(params)
        gathered_counts.append(len(params))
        return gather(params, **kwargs)

    online.gathered_parameters = counting_gather
    d = None
    for case in cases.split(","):
        stage, precision, *persist = case.split(":")
        user_config = _persistence_config(int(persist[0])) if persist else None
        config = DistillConfig(
            preset=get_preset("tiny", iterations=3, reset_every=100),
            zero=int(stage),
            precision=precision,
            progress=False,
            device="cpu",
            deepspeed_config=user_config,
        )
        d = Distiller(config, log=lambda _m: None)
        pretrained = d.model.pretrained_state()
        params = dict(d.model.named_parameters())
        names = [k for k in pretrained if k in params]
        heads = len(list(d.model.image_proj.parameters())) + len(list(d.model.text_proj.parameters())) + 1

        def differences(params=params, names=names, pretrained=pretrained) -> list:
            with gathered_parameters([params[k] for k in names]):
                return [k for k in names if not torch.equal(params[k].detach(), pretrained[k].to(params[k].dtype))]

        for round, batches in enumerate(((0, 3), (6, 8))):
            *first, last = d.real_batches(*batches)
            gathered_counts.clear()
            for batch in first:
                d.step(batch)
            if stage == "3" and round == 0:  # iteration 0's reset, the first: module by module, then the heads
                modules = [*d.model.image.modules(), *d.model.text.modules()]
                most = max(len(list(m.parameters(recurse=False))) for m in modules)
                assert gathered_counts[-1] == heads and max(gathered_counts[:-1]) <= most, (gathered_counts, most)
            assert differences(), "the online steps did not change the encoders"
            d.step(last)  # DeepSpeed's state as training leaves it (persistent parameters gathered, not partitioned)
            d.engine.optimizer.loss_scaler.cur_scale /= 4  # as fp16's would be after overflows
            scaler = dict(vars(d.engine.optimizer.loss_scaler))
            gathered_counts.clear()
            d.online.reset(stream_generator(0, "reset", 3 + round))
            persistent = [p for p in params.values() if getattr(p, "ds_persist", False)]
            assert all(p.ds_status.name == "AVAILABLE" for p in persistent), "persistent parameters left partitioned"
            moved = differences()
            assert moved == [], f"after the reset: {moved[:3]} differ from the pretrained weights"
            assert vars(d.engine.optimizer.loss_scaler) == scaler, "the reset changed the loss scaler"
            if stage == "3":
                assert gathered_counts == [heads], f"a later reset gathered {gathered_counts}, not the {heads} heads"
                local = sum(v.numel() for v in d.online._local_pretrained.values)  # this rank's share, padded
                full = sum(pretrained[k].numel() for k in names if k.startswith(("image.", "text.")))
                assert local <= full / d.ranks.world_size + len(names), (local, full)
            # A step on a zero gradient must not move anything: the fp32 master weights were refreshed and the
            # momentum buffers cleared (a stale master copy or momentum would pull the weights away).
            pixels, ids, mask, _ = next(iter(d.real_batches(5, 6)))
            with d.autocast():
                loss = d.engine(pixels, input_ids=ids, attention_mask=mask)
            d.engine.backward(loss * 0.0)
            d.engine.step()
            moved = differences()
            assert moved == [], f"a zero-gradient step after the reset moved {moved[:3]}"
        label = f"ZeRO-{stage} {precision}" + (f" persistence {persist[0]}" if persist else "")
        print(f"rank {d.ranks.rank}: {label}: the reset restores the pretrained state", flush=True)
    d.close(finished=True)


def scenario_chunked() -> None:
    from covmatch.distill import DistillConfig, Distiller
    from covmatch.presets import get_preset

    sets = {}
    for chunk in (None, 3):  # both runs in the process group the first one joins
        preset = get_preset("tiny", num_pairs=12, syn_batch=8, iterations=5, online="real")
        config = DistillConfig(preset=preset, syn_chunk=chunk, progress=False, device="cpu")
        d = Distiller(config, log=lambda _m: None)
        initial = d.synthetic_set()
        sets[chunk] = d.run()
    rank = d.ranks.rank
    d.close(finished=True)
    single, chunked = sets[None], sets[3]
    assert not torch.equal(single.images, initial.images)
    for key in ("images", "text_embeds"):
        a, b = getattr(chunked, key), getattr(single, key)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max())), (key, float((a - b).abs().max()))
    print(f"rank {rank}: chunked run == single-pass run", flush=True)


def scenario_online_steps() -> None:
    """One process: after two tiny fp32 iterations the online model under ZeRO 1, 2 and 3 equals plain
    PyTorch's (no DeepSpeed default, such as its gradient clipping, changes the steps); then, the run closed,
    another DeepSpeed run starts in the same process."""
    import deepspeed.utils.groups

    from covmatch.distill import DistillConfig, Distiller
    from covmatch.distill.distributed import gathered_parameters
    from covmatch.presets import get_preset

    def after_two_iterations(zero: int, online: str = "real"):
        config = DistillConfig(preset=get_preset("tiny"), zero=zero, online=online, progress=False, device="cpu")
        d = Distiller(config, log=lambda _m: None)
        for real_batch, online_batch in zip(d.real_batches(0, 2), d.online_batches(0, 2)):
            d.step(real_batch, online_batch)
        with gathered_parameters(d.model.parameters()):
            return d, {name: p.detach().float().clone() for name, p in d.model.named_parameters()}

    def distance(a: dict, b: dict) -> float:
        return sum(float((a[k] - b[k]).norm()) ** 2 for k in a) ** 0.5

    _, start = after_two_iterations(0, online="fixed")
    _, plain = after_two_iterations(0)
    moved = distance(plain, start)
    assert moved > 0.5, f"the online model moved {moved:.3g}: too little to tell clipped steps from others"
    for stage in (1, 2, 3):  # one engine after another in the process group the first one joins
        d, zero = after_two_iterations(stage)
        apart = distance(zero, plain)
        assert apart < 1e-3 * moved, f"ZeRO-{stage}: {apart:.3g} from plain PyTorch's weights (they moved {moved:.3g})"
        print(
            f"ZeRO-{stage}: the online steps equal plain PyTorch's ({apart:.2g} apart, {moved:.2g} moved)", flush=True
        )
    d.close(finished=True)
    if hasattr(deepspeed.utils.groups, "_release_process_group_references"):  # DeepSpeed >= 0.19.8
        d, _ = after_two_iterations(2)
        d.close(finished=True)
        print("a second DeepSpeed run after close", flush=True)


def scenario_fp16_boundary() -> None:
    """One process, DeepSpeed's fp16 ZeRO-2 on the CPU (its CPU accelerator told fp16 is supported, which it
    denies; covmatch itself refuses --fp16 --zero off CUDA): an online model resumed from what a reset-boundary
    checkpoint keeps (``boundary_state_dict``, through torch.save and a weights-only load) trains as the
    uninterrupted one does, overflow skips, loss scale and step counters included."""
    import io

    from deepspeed.accelerator import get_accelerator

    from covmatch.distill import DistillConfig
    from covmatch.distill.distributed import build_ds_config, setup_processes
    from covmatch.distill.online import DeepSpeedOnlineModel
    from covmatch.distill.precision import autocast_for
    from covmatch.distill.streams import stream_generator
    from covmatch.presets import get_preset
    from covmatch.pretrain import pretrained_dual_encoder

    type(get_accelerator()).is_fp16_supported = lambda self: True
    preset = get_preset("tiny")
    config = DistillConfig(preset=preset, zero=2, precision="fp16", progress=False, device="cpu")
    ranks, device = setup_processes("cpu", 2)
    ds_config = build_ds_config(2, "fp16", preset.real_batch)

    def online_model() -> DeepSpeedOnlineModel:
        torch.manual_seed(0)
        model = pretrained_dual_encoder(preset, progress=False)
        autocast = autocast_for(device, "fp16")
        return DeepSpeedOnlineModel(model, config, ranks=ranks, device=device, autocast=autocast, ds_config=ds_config)

    def batch(t: int):
        g = torch.Generator().manual_seed(t)
        pixels = torch.randn(preset.real_batch, 3, preset.image_size, preset.image_size, generator=g)
        ids = torch.randint(1000, 2000, (preset.real_batch, preset.seq_len), generator=g)
        return pixels, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def train(online: DeepSpeedOnlineModel, start: int, stop: int) -> list:
        torch.manual_seed(start)  # dropout's draws, which a checkpoint's RNG state would restore
        if start % 3 == 0:
            online.reset(stream_generator(0, "reset", start, device=device))
        return [float(online.train_step(*batch(t))) for t in range(start, stop)]

    whole = online_model()
    train(whole, 0, 3)  # in fp16 throughout, the tiny model's gradients overflow at DeepSpeed's initial 2^16
    assert whole.engine.skipped_steps > 0, "no fp16 overflow: no loss scale of its own to carry over"
    buffer = io.BytesIO()
    torch.save(whole.boundary_state_dict(), buffer)
    skipped = whole.engine.skipped_steps
    losses = train(whole, 3, 6)
    assert whole.engine.skipped_steps < skipped + 3, "every step after the boundary skipped: nothing trained"
    resumed = online_model()
    resumed.load_boundary_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert train(resumed, 3, 6) == losses
    for name in ("global_steps", "global_samples", "skipped_steps"):
        assert getattr(resumed.engine, name) == getattr(whole.engine, name), name
    assert vars(resumed.engine.optimizer.loss_scaler) == vars(whole.engine.optimizer.loss_scaler)
    weights = [dict(m.model.named_parameters()) for m in (whole, resumed)]
    assert all(torch.equal(p, weights[1][k]) for k, p in weights[0].items()), "the weights differ after resuming"
    scale = whole.engine.optimizer.loss_scaler.cur_scale
    print(f"fp16 ZeRO-2: resumed at a reset boundary (loss scale {scale:g}, {whole.engine.skipped_steps} skips)")
    whole.close()
    resumed.close()


def scenario_checkpointed() -> None:
    """ZeRO-3 with no parameter persistent (each module's weights gathered on entry, released on exit): a run
    whose encoders checkpoint each block (the recomputation in backward gathers the weights again) distils the
    set and trains the online model as the run without checkpointing does, a reset included."""
    from covmatch.distill import DistillConfig, Distiller
    from covmatch.distill.distributed import gathered_parameters
    from covmatch.presets import get_preset

    user_config = _persistence_config(0)
    results = {}
    for checkpointing in (False, True):  # both runs in the process group the first one joins
        preset = get_preset("tiny", iterations=4, reset_every=3, syn_batch=8, num_pairs=8)
        config = DistillConfig(
            preset=preset, zero=3, grad_checkpointing=checkpointing, progress=False, device="cpu",
            deepspeed_config=user_config,
        )  # fmt: skip
        d = Distiller(config, log=lambda _m: None)
        first_conv = d.model.image.model.stages[0][0].conv1
        calls = []
        first_conv.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        synthetic = d.run()
        params = dict(d.model.named_parameters())
        with gathered_parameters(params.values()):
            weights = {k: p.detach().clone() for k, p in params.items()}
        results[checkpointing] = synthetic, weights, len(calls)
    rank = d.ranks.rank
    d.close(finished=True)
    (plain, plain_weights, plain_calls), (ckpt, ckpt_weights, ckpt_calls) = results[False], results[True]
    assert ckpt_calls > plain_calls, f"no block recomputed: {ckpt_calls} forward calls against {plain_calls}"
    for key in ("images", "text_embeds"):
        a, b = getattr(ckpt, key), getattr(plain, key)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), (key, float((a - b).abs().max()))
    for k, p in plain_weights.items():
        assert torch.allclose(ckpt_weights[k], p, rtol=1e-4, atol=1e-6), (k, float((ckpt_weights[k] - p).abs().max()))
    print(f"rank {rank}: ZeRO-3 checkpointed run == plain run ({ckpt_calls} against {plain_calls} block calls)")


def scenario_compiled(stages: str) -> None:
    """One process, fp32; ``stages``: comma-separated ZeRO stages (1, 2). With ``--compile`` under DeepSpeed
    (whose engine wraps the compiled encoders and reduces the gradients their compiled backward produces) four
    iterations with two resets take the eager run's steps of the set and of the online model, to 1e-3 of each
    set tensor's step and of the online model's, and no graph is compiled after the second iteration. In bf16
    the comparison says little: DeepSpeed's 16-bit weights round every step, and eager bf16 and fp32 runs
    already differ by most of the caption step. Inductor's C++ kernels without SIMD and eager's random numbers,
    as in test_compiled_step.py."""
    import torch._inductor.config as inductor_config

    from covmatch.distill import DistillConfig, Distiller
    from covmatch.distill.compilation import compiled_graphs
    from covmatch.presets import get_preset

    def learnt(d) -> dict:
        tensors = {**d.synthetic.learned(), **dict(d.model.named_parameters())}
        return {k: t.detach().float().clone() for k, t in tensors.items()}

    def run(stage: int, compile: bool):
        preset = get_preset("tiny", online="real", reset_every=2, iterations=4)
        config = DistillConfig(preset=preset, zero=stage, compile=compile, progress=False, device="cpu")
        torch.manual_seed(0)
        d = Distiller(config, log=lambda _m: None)
        start, before, graphs = learnt(d), compiled_graphs(), []
        for real, online in zip(d.real_batches(0, 4), d.online_batches(0, 4)):
            d.step(real, online)
            graphs.append(compiled_graphs() - before)
        steps = {k: t - start[k] for k, t in learnt(d).items()}
        return d, steps, graphs, d.engine.skipped_steps

    settings = {"cpp.vec_isa_ok": False, "fx_graph_cache": False, "fallback_random": True}
    for stage in stages.split(","):
        with inductor_config.patch(settings):
            # one engine after another in the process group the first one joins (DeepSpeed < 0.19.8 cannot
            # start another after a close)
            _, eager, _, eager_skipped = run(int(stage), compile=False)
            d, compiled, graphs, skipped = run(int(stage), compile=True)
        assert skipped == eager_skipped == 0, (skipped, eager_skipped)
        assert 0 < graphs[1] == graphs[-1], f"graphs compiled by each iteration: {graphs}"
        # the set tensor by tensor; the online model as one vector (a tensor whose gradient nearly cancels
        # takes a step of rounding size, which inductor's reordered sums move by percents, in torch 2.4 say)
        gaps = {k: float((compiled[k] - eager[k]).norm() / eager[k].norm()) for k in ("images", "text_embeds")}
        weights = [k for k in eager if k not in gaps]
        gap = torch.stack([(compiled[k] - eager[k]).norm() for k in weights]).norm()
        moved = torch.stack([eager[k].norm() for k in weights]).norm()
        gaps["online model"] = float(gap / moved)
        assert moved > 0 and min(eager[k].norm() for k in ("images", "text_embeds")) > 0, "nothing moved"
        assert max(gaps.values()) <= 1e-3, gaps
        summary = ", ".join(f"{k} {v:.1g}" for k, v in gaps.items())
        print(f"ZeRO-{stage}: the compiled run takes the eager run's steps ({graphs[-1]} graphs; apart by a "
              f"fraction of each step: {summary})", flush=True)  # fmt: skip
    d.close(finished=True)


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    if name == "loss":
        scenario_loss()
    elif name == "reset":
        scenario_reset(args[0])
    elif name == "chunked":
        scenario_chunked()
    elif name == "online-steps":
        scenario_online_steps()
    elif name == "fp16-boundary":
        scenario_fp16_boundary()
    elif name == "checkpointed":
        scenario_checkpointed()
    elif name == "compiled":
        scenario_compiled(args[0] if args else "2")
    else:
        raise SystemExit(f"unknown scenario {name!r}")
