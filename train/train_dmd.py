"""DMD / DMD2 distillation with a GET as the one-step generator (docs/DISTILL.md), one process or torchrun DDP.

    python train/train_dmd.py --method dmd  --generator runs/GET-B-2-.../checkpoints/0800000 --data data/pairs/...
    python train/train_dmd.py --method dmd2 --generator CKPT --data DIR --teacher edm-cifar10-32x32-uncond-vp
    torchrun --nproc-per-node 8 train/train_dmd.py --method dmd2 ...          # or: python ... --nproc 8
    python train/train_dmd.py --resume --outdir runs/...                       # continue a run exactly

Networks: the generator G is a GET (from an offline-distilled checkpoint, --generator, or from scratch, --model); the
real score is the frozen teacher (default: the one that made the pairs, checked by its sha256); the fake score is a
trainable copy of the teacher's network for EDM teachers, and for the analytic teacher (which has no network) a small
DDPM++ network (get.distill.dmd.small_fake_score) that is first warmed up for --fake-warmup iterations by denoising
score matching on G's samples before G starts to move. DMD2 adds a GAN head on the fake network's bottleneck.

Each iteration: when it is G's turn (DMD every iteration, DMD2 every --ttur-th after the warm-up), one G update on
the distribution-matching loss plus DMD's regression on a pair batch (--reg-loss, LPIPS, weight 0.25) or DMD2's GAN
term; then one critic update (EDM-weighted denoising of G's samples, plus DMD2's discriminator loss on real images,
--real: the analytic teacher's exact samples by default; for EDM teachers a data set, or the pairs' teacher images
only when asked for with --real pairs, which caps the student at the teacher's ODE). Defaults: the papers' AdamW
(lr 5e-5, weight decay 0.01, betas (0.9, 0.999)) for both optimisers, DMD2's linear learning-rate warm-up over each
optimiser's first 500 updates (none for DMD), gradient clipping at 10, global batch 392 (DMD's CIFAR-10 batch), no
EMA (as DMD2). The global batch is --bs on any number of ranks. Metrics every --eval-every steps: the exact metrics
of the analytic teacher (get.metrics.MixtureEvaluator: Fréchet distance to the true distribution in pixel and
feature space, ...), or FID against --fid-ref statistics for EDM teachers.

G is trained on its last fixed-point iterate (trajectory()[-1]), so the GET it trains, evaluates and saves returns
that iterate at evaluation too (DEQ option eval_select="last", saved in its config; docs/DISTILL.md).
"""

import argparse
import math
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from get import dist
from get.data import EpochSampler, PairDataset, PairSettings, micro_batches
from get.distill import dmd
from get.distill.real_data import default_real_spec, make_real_source
from get.images import save_image_grid, to_uint8
from get.losses import LOSSES
from get.metrics import MixtureEvaluator, fid
from get.models import GET, GET_models, count_parameters, create_model
from get.seeds import derived_seed, draw_inputs, parse_seeds, rank_seed, seed_all
from get.teachers import load_teacher
from get.training.checkpoints import load_checkpoint, prepare_run_dir, record_options, save_checkpoint
from get.training.cli import (
    NON_NEGATIVE,
    POSITIVE_INT,
    UserError,
    add_common_arguments,
    blame,
    check_common_arguments,
    check_ranges,
    check_seeds_option,
    run_script,
)
from get.training.guards import NonFiniteGuard
from get.training.logs import StatsLogger, Throughput, plot_loss_curve
from get.training.modules import MethodWrapper, check_ddp_consistency, requires_grad, update_ema
from get.training.pairs import data_identity, resume_data

#################################################################################
#                                  Helpers                                      #
#################################################################################


def build_teacher(args, ds, device):
    """The real score: --teacher, or the teacher recorded in the pairs' manifest; must be the one that made them."""
    recorded = ds.teacher if isinstance(ds.teacher, dict) else {}
    spec = args.teacher or recorded.get("name")
    if not spec:
        raise UserError(f"--data {args.data}: the manifest names no teacher; pass --teacher")
    with blame("--teacher"):
        teacher = load_teacher(spec, device)
    if "sha256" in recorded and teacher.identity()["sha256"] != recorded["sha256"]:
        raise UserError(f"--teacher {spec}: its weights (sha256 {teacher.identity()['sha256'][:16]}...) are not those "
                        f"of the teacher that made {args.data} ({recorded.get('name')}, {recorded['sha256'][:16]}...)")
    for attr, value in (("resolution", ds.resolution), ("channels", ds.channels), ("label_dim", ds.label_dim)):
        if getattr(teacher, attr) != value:
            raise UserError(f"--teacher {spec}: {attr} {getattr(teacher, attr)} but the pairs have {value}")
    return teacher


def build_generator(args, ds, device):
    """G (trainable) and its EMA copy (None without --ema): from --generator, or a fresh --model seeded by --seed."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    overrides = {} if args.backend is None else {"backend": args.backend}
    if args.generator is not None:
        with blame("--generator"):
            model = GET.from_pretrained(args.generator, ema=args.generator_ema, **overrides)
    else:
        model = create_model(args.model, input_size=ds.resolution, in_channels=ds.channels,
                             num_classes=ds.label_dim if ds.conditional else 0, **overrides)
    want = dict(input_size=ds.resolution, in_channels=ds.channels, num_classes=ds.label_dim)
    have = {k: model.config[k] for k in want}
    if have != want:
        raise UserError(f"--generator {args.generator}: the GET has {have}, the pairs need {want}")
    o = model.deq_options
    if o["f_max_iter"] or o["ift"] or o["tau"] != 1.0:
        raise UserError(f"--generator {args.generator}: DEQ options f_max_iter={o['f_max_iter']}, ift={o['ift']}, "
                        f"tau={o['tau']}; DMD trains the plain {o['grad']}-step path (f_max_iter=0, ift=False, tau=1)")
    # G learns trajectory()[-1]; evaluation, samples and the saved config must return that iterate, not torchdeq's
    # lowest-residual one (which on distilled GETs is mostly an earlier, untrained iterate; docs/DISTILL.md).
    model.set_deq_options(eval_select="last", eval_f_max_iter=o["grad"])
    model = model.to(device)
    model.check_finite = False  # the loop checks finiteness itself, on every rank alike
    ema = None
    if args.ema > 0:
        ema = type(model)(**model.config).to(device)
        ema.load_state_dict(model.state_dict())
        requires_grad(ema, False)
        ema.eval()
    return model, ema


def build_critic(args, settings, teacher, device):
    """The fake score (copy of an EDM teacher, or the small network) and, for DMD2, the GAN head on its bottleneck."""
    torch.manual_seed(args.seed + 1)
    fake = dmd.make_fake_score(teacher, args.fake_score, model_channels=args.fake_channels).to(device).train()
    head = None
    if settings.method == "dmd2":
        channels, side, _ = dmd.bottleneck_shape(fake, teacher.channels, teacher.resolution, teacher.label_dim)
        head = dmd.GANHead(channels, side).to(device)
    grid = dmd.karras_sigmas(settings.num_sigmas, settings.sigma_min, settings.sigma_max, settings.rho, device)
    return dmd.Critic(settings, fake, head, grid)


@torch.no_grad()
def generate(model, seeds, settings: PairSettings, device, sigmas, batch=500):
    """Samples (N, C, R, R) and labels of seeds, drawn as every script draws them (get.seeds): latents and labels
    with the pairs' label policy and generator device, each seed's z_0; a multi-step generator re-noises from each
    seed's own generator and continues its z_0 stream."""
    out, labels = [], []
    for i in range(0, len(seeds), batch):
        inputs = draw_inputs(seeds[i:i + batch], model, label_policy=settings.label_policy,
                             rng_device=settings.rng_device, device=device)
        z0s = [inputs.z0]  # the first call takes the drawn z_0; later calls continue each seed's z_0 stream

        def sample_fn(inp, inputs=inputs, z0s=z0s):
            z0 = z0s.pop() if z0s else inputs.z0_stream.randn(inputs.z0.shape).to(inp.device)
            return model(inp, inputs.labels, z0=z0)

        out.append(dmd.sample_generator(sample_fn, inputs.latents, sigmas, inputs.noise.randn_like).cpu())
        labels.append(None if inputs.labels is None else inputs.labels.cpu())
    return torch.cat(out), (None if labels[0] is None else torch.cat(labels))


def evaluate(model, args, teacher, settings: PairSettings, device, sigmas, evaluator):
    """Rank 0's metrics of the generator on --eval-seeds: the analytic teacher's exact metrics, or FID (--fid-ref)."""
    seeds = parse_seeds(args.eval_seeds)
    samples, labels = generate(model, seeds, settings, device, sigmas)
    if evaluator is not None:
        metrics = evaluator(samples, class_labels=labels if teacher.label_dim else None)
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return {"fid": fid(to_uint8(samples), args.fid_ref, mode=args.fid_mode, device=device)}


def build_regression(args, channels, device):
    """DMD's regression loss (--reg-loss, LPIPS by default); missing LPIPS weights are a one-line error."""
    try:
        fn = dmd.regression_loss(args.reg_loss, channels, args.lpips_vgg, args.lpips_lin)
    except (FileNotFoundError, ValueError) as e:  # the messages name the flags and files
        raise UserError(str(e)) from e
    return fn.to(device) if isinstance(fn, torch.nn.Module) else fn


def build_real_source(args, ds, teacher, rank, world):
    """DMD2's real images (--real): the analytic teacher's exact samples by default; an EDM teacher needs a data set,
    or --real pairs (the pairs' teacher images: the discriminator then pulls G towards the teacher's ODE outputs)."""
    spec = args.real
    if spec is None:
        if default_real_spec(teacher) != "teacher":
            raise UserError(f"--real: teacher {teacher.name} has no exact sampler; DMD2's discriminator needs real "
                            f"images: pass --real DATA (a .npz, a folder of PNGs, or CIFAR-10's cifar-10-batches-bin "
                            f"folder), or --real pairs to use the pairs' teacher images")
        spec = "teacher"
    if spec == "pairs":
        dist.print0("Warning: --real pairs: DMD2's discriminator sees the teacher's own ODE samples as real data, "
                    "which caps the student at the teacher's ODE; pass real data to go beyond it.")
    with blame(f"--real {spec}"):
        return make_real_source(spec, teacher, pairs=ds, seed=args.seed, rank=rank, world_size=world)


def lr_scale(updates: int, warmup: int) -> float:
    """Linear warm-up factor of an optimiser's update number `updates` (1-based), DMD2's constant_with_warmup."""
    return min(1.0, updates / warmup) if warmup else 1.0


def generator_updates(step: int, fake_warmup: int, ttur: int) -> int:
    """How many generator turns iterations 0..step hold (after the fake-score warm-up, every ttur-th)."""
    return 0 if step < fake_warmup else (step - fake_warmup) // ttur + 1


#################################################################################
#                                Training loop                                  #
#################################################################################


def main(args):
    device = dist.init(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.bs % world:
        raise UserError(f"--bs {args.bs} is not divisible by the world size {world}")
    per_rank = args.bs // world
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    settings = dmd.DMDSettings(args.method, ttur=args.ttur, reg_weight=args.reg_weight,
                               gen_gan_weight=args.gen_gan_weight, critic_gan_weight=args.critic_gan_weight,
                               gen_sigmas=tuple(args.gen_sigmas), backward_simulation=args.backward_simulation)

    # Data, networks, optimisers.
    with blame("--data"):
        ds = PairDataset(args.data)
    if len(ds) < args.bs:
        raise UserError(f"--data {args.data}: {len(ds)} pairs, fewer than one batch (--bs {args.bs})")
    teacher = build_teacher(args, ds, device)
    model, ema = build_generator(args, ds, device)
    critic = build_critic(args, settings, teacher, device)
    fake_kind = args.fake_score if args.fake_score != "auto" else (
        "copy" if dmd.is_edm_network(teacher) else "scratch")
    fake_warmup = args.fake_warmup if args.fake_warmup is not None else (0 if fake_kind == "copy" else 1000)
    g_params = [p for p in model.parameters() if p.requires_grad]
    c_params = list(critic.parameters())
    fake_lr = args.fake_lr if args.fake_lr is not None else args.lr  # --fake-lr 0 is 0, not --lr
    adamw = dict(betas=(args.beta1, args.beta2), eps=args.eps, weight_decay=args.wd)
    opt_g = torch.optim.AdamW(g_params, lr=args.lr, **adamw)
    opt_c = torch.optim.AdamW(c_params, lr=fake_lr, **adamw)
    reg_fn = build_regression(args, ds.channels, device) if args.method == "dmd" else None
    real = build_real_source(args, ds, teacher, rank, world) if args.method == "dmd2" else None
    sampler = EpochSampler(len(ds), rank, world, seed=args.seed, drop_last=True)
    z0_gen = torch.Generator(device).manual_seed(rank_seed(args.seed, rank))  # GET's z_0 in training
    # One guard per update: the critic's good updates must not hide a generator that never updates, or the reverse.
    guards = {"generator": NonFiniteGuard(args.max_nonfinite, "generator updates"),
              "critic": NonFiniteGuard(args.max_nonfinite, "critic updates")}
    seed_all(rank_seed(args.seed + 1, rank))  # sigma, noise, latents and labels: per-rank streams

    modules = {"model": model, "fake": critic.fake}
    if critic.head is not None:
        modules["head"] = critic.head
    if ema is not None:
        modules["ema"] = ema
    optimizers = {"generator": opt_g, "critic": opt_c}

    # Run folder; resume.
    identity = data_identity(ds)  # the pair set's, recorded in every checkpoint
    options = dict({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, world_size=world,
                   per_rank_batch=per_rank, settings=settings.to_dict(), fake_warmup_resolved=fake_warmup,
                   fake_score_resolved=fake_kind, real_resolved=None if real is None else type(real).__name__,
                   teacher_identity={k: v for k, v in teacher.identity().items() if k != "config"},
                   model_config=model.config, fake_config=critic.fake.config,
                   dataset=dict(identity, resolution=ds.resolution, channels=ds.channels,
                                label_dim=ds.label_dim))
    with blame("--outdir"):
        run_dir, ckpt = prepare_run_dir(args.outdir, args.resume)
    step = 0
    if ckpt is None and args.init_fake is not None:  # weights only: a warmed-up fake score (and head)
        with blame("--init-fake"):
            load_checkpoint(args.init_fake, {k: v for k, v in modules.items() if k in ("fake", "head")},
                            restore_rng=False)
        dist.print0(f"Fake score{' and GAN head' if critic.head is not None else ''} from {args.init_fake}.")
    if ckpt is not None:
        with blame("--resume"):
            meta = load_checkpoint(ckpt, modules, optimizers, {"z0": z0_gen})
        step = meta["step"]
        options["data_change"] = resume_data(meta["state"], ds, sampler, args.allow_data_change)
        if real is not None:
            saved = meta["state"].get("real")
            if saved is None:
                raise UserError(f"--resume: {ckpt} has no real-data stream (a DMD2 run from before --real); start a "
                                f"new run (--init-fake and --generator can start it from this checkpoint's weights)")
            with blame(f"--resume: the real-data stream of {ckpt} (--real)"):
                # Every rank draws as many batches as rank 0, whose state is saved: only the rank is its own.
                real.load_state_dict(dict(saved, rank=rank) if "rank" in saved else saved)
        for name, guard in guards.items():
            # Checkpoints from before the split had one shared count: it bounds each update's run of skips.
            guard.load_state_dict(meta["state"]["guards"][name] if "guards" in meta["state"]
                                  else meta["state"]["guard"])
        if not meta["rng_restored"]:  # another world size: fresh streams, still deterministic
            z0_gen.manual_seed(rank_seed(args.seed + step, rank))
            seed_all(rank_seed(args.seed + 1 + step, rank))
        dist.print0(f"Resumed from {ckpt} at step {step}.")
    record_options(run_dir, options, ckpt)  # only once the start or resume is accepted
    dist.print0(f"{args.method.upper()}: GET {count_parameters(model, trainable_only=True):,} parameters, fake "
                f"score {count_parameters(critic):,} (with head); teacher {teacher.name}; {len(ds):,} pairs "
                f"{ds.channels}x{ds.resolution}x{ds.resolution}; batch {args.bs} = world {world} x {per_rank}; "
                f"fake warm-up {fake_warmup} iterations; run {run_dir}")

    g_ddp, c_ddp = MethodWrapper(model, "trajectory"), critic
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        g_ddp, c_ddp = DDP(g_ddp, device_ids=ids), DDP(critic, device_ids=ids)
    model.train()
    evaluator = None
    if dist.is_main() and args.eval_every and hasattr(teacher, "log_prob"):
        evaluator = MixtureEvaluator(teacher, n_ref=args.eval_ref)
    elif args.eval_every and args.fid_ref is None:
        dist.print0("No metrics during training: pass --fid-ref statistics (.npz) for an EDM teacher.")
    can_eval = evaluator is not None or args.fid_ref is not None
    logger = StatsLogger(run_dir, start_step=step)
    meter = Throughput()
    data = micro_batches(ds, sampler, per_rank, device)
    sums, counts = {}, {}
    sigmas, C, R = settings.gen_sigmas, ds.channels, ds.resolution

    def accumulate(stats):
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value.detach().double()
            counts[key] = counts.get(key, 0) + 1

    def sample_model():
        return ema if ema is not None else model

    def log_metrics(step):
        metrics = evaluate(sample_model().eval(), args, teacher, ds.settings, device, sigmas, evaluator)
        model.train()
        logger.log(step, {f"eval/{k}": v for k, v in metrics.items()})
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    def optimizer_step(opt, params, loss, kind, step):
        """Backward, clip, the non-finite check agreed by all ranks (counted by the guard of `kind`), step; returns
        the gradient norm, or None when the update was skipped."""
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad if args.clip_grad > 0 else float("inf"))
        ok = bool(dist.all_mean((torch.isfinite(loss) & torch.isfinite(norm)).double()) == 1)
        guard = guards[kind]
        if guard.check(ok, step + 1):
            opt.step()
        elif dist.is_main():
            bar.write(f"step {step + 1}: non-finite {kind} loss or gradient, update skipped ({guard.in_row} in a row)")
        opt.zero_grad(set_to_none=True)
        return norm if ok else None

    bar = tqdm(total=args.steps, initial=step, disable=not dist.is_main(), dynamic_ncols=True, desc=args.method)
    if step == 0 and can_eval and dist.is_main():
        log_metrics(0)  # the starting generator, under the same protocol
    while step < args.steps:
        # Each optimiser warms up over its own first --warmup updates (DMD2 steps its generator's scheduler only
        # on generator turns); both counts follow from the step, so a resume continues them exactly.
        g_scale = lr_scale(generator_updates(step, fake_warmup, settings.ttur), args.warmup)
        for opt, base, scale in ((opt_g, args.lr, g_scale), (opt_c, fake_lr, lr_scale(step + 1, args.warmup))):
            for group in opt.param_groups:
                group["lr"] = base * scale
        batch = next(data) if args.method == "dmd" else None  # pairs: DMD's regression (noise, target)
        latents = torch.randn(per_rank, C, R, R, device=device)  # (B, C, R, R)
        labels = torch.randint(ds.label_dim, (per_rank,), device=device) if ds.conditional else None
        if settings.backward_simulation:  # the same generator step on every rank
            s = int(torch.randint(len(sigmas), (1,), generator=torch.Generator().manual_seed(
                derived_seed(args.seed, step))))
            sample_fn = lambda inp, labels=labels: model(inp, labels, generator=z0_gen)
            latents = dmd.backward_simulation(sample_fn, latents, sigmas, s)
        onehot = dmd.one_hot(labels, ds.label_dim)

        generator_turn = step >= fake_warmup and dmd.is_generator_turn(step - fake_warmup, settings.ttur)
        if generator_turn:
            requires_grad(critic, False)
            if args.method == "dmd":  # one G forward over the fresh latents and the pairs' noise
                both = torch.cat([latents, batch["noise"]])
                both_labels = None if labels is None else torch.cat([labels, batch["label"]])
                x, x_ref = g_ddp(both, both_labels, generator=z0_gen)[-1].float().split([per_rank, per_rank])
                regression = reg_fn(x_ref, batch["image"])
            else:
                x, regression = g_ddp(latents, labels, generator=z0_gen)[-1].float(), None
            loss_g, stats_g = dmd.generator_loss(settings, x, teacher, critic.fake, critic.grid, onehot, critic.head,
                                                 regression)
            norm = optimizer_step(opt_g, g_params, loss_g, "generator", step)
            if norm is not None:
                if ema is not None:
                    update_ema(ema, model, args.ema)
                accumulate(dict(stats_g, loss_g=loss_g, grad_norm_g=norm))
            requires_grad(critic, True)
            x_fake = x.detach()
        else:
            with torch.no_grad():
                x_fake = model.trajectory(latents, labels, generator=z0_gen)[-1].float()

        x_real, real_labels = real.sample(per_rank, device) if real is not None else (None, None)
        diagnose = (step + 1) % args.log_every == 0  # how well the fake score models G, against the teacher
        loss_c, stats_c = c_ddp(x_fake, onehot, x_real, dmd.one_hot(real_labels, ds.label_dim),
                                teacher if diagnose else None)
        norm = optimizer_step(opt_c, c_params, loss_c, "critic", step)
        if norm is not None:
            accumulate(dict(stats_c, loss_c=loss_c, grad_norm_c=norm))
        step += 1
        meter.update(args.bs)
        bar.update(1)

        # Logs, metrics, samples, checkpoints.
        if step % args.log_every == 0 or step == args.steps:
            stats = dict(lr=args.lr * g_scale, img_per_s=meter.rate(), epoch=sampler.epoch,
                         skipped_g=guards["generator"].total, skipped_c=guards["critic"].total)
            # Means of the updates that ran (the same on every rank); an interval whose updates of one kind were all
            # skipped logs none of that kind's keys.
            stats.update({k: float(dist.all_mean(v / counts[k])) for k, v in sorted(sums.items())})
            logger.log(step, stats)
            bar.set_postfix({name: f"{stats[key]:.3g}" for name, key in (("dm", "loss_dm"), ("fake", "loss_fake"))
                             if key in stats})
            sums.clear()
            counts.clear()
        if step % args.ckpt_every == 0 or step == args.steps:  # first: a failing evaluation or grid loses no step
            check_ddp_consistency(model)
            check_ddp_consistency(critic)
            state = dict(sampler=sampler.state_dict(), guards={k: g.state_dict() for k, g in guards.items()},
                         data=identity, **({} if real is None else {"real": real.state_dict()}))
            save_checkpoint(run_dir, step, modules, optimizers, state, {"z0": z0_gen}, keep=args.keep)
        if dist.is_main() and args.eval_every and can_eval and (step % args.eval_every == 0 or step == args.steps):
            log_metrics(step)
        if dist.is_main() and (step % args.sample_every == 0 or step == args.steps):
            images, _ = generate(sample_model(), parse_seeds(args.grid_seeds), ds.settings, device, sigmas)
            save_image_grid(images, run_dir / "samples" / f"{step:07d}.png")
            plot_loss_curve(run_dir, keys=("loss_dm", "loss_fake"))
    bar.close()
    logger.close()
    dist.print0(f"Done: {step} steps in {run_dir}")
    dist.cleanup()


#################################################################################
#                                Command line                                   #
#################################################################################


def float_list(s: str) -> list[float]:
    try:
        values = [float(v) for v in s.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {s!r}")
    return values


def fake_channels_ok(c: int) -> bool:
    """The small fake score's widths C and 2C (channel_mult (1, 2, 2)) pass EDM's GroupNorm: min(32, width // 4)
    groups that divide the width (get.edm.layers.GroupNorm)."""
    return all(w >= 4 and w % min(32, w // 4) == 0 for w in (c, 2 * c))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=dmd.METHODS, required=True)
    p.add_argument("--data", type=Path, required=True, help="pair folder (data_gen/generate.py output)")
    p.add_argument("--teacher", default=None, help="real score (load_teacher spec); default: the pairs' teacher")
    p.add_argument("--generator", type=Path, default=None, help="GET checkpoint to start from (train_get.py output), "
                   "e.g. runs/.../checkpoints/0800000")
    p.add_argument("--generator-ema", action=argparse.BooleanOptionalAction, default=True,
                   help="start from the checkpoint's EMA weights (--no-generator-ema: its raw weights)")
    p.add_argument("--model", choices=list(GET_models), default=None, help="start from scratch with this config")
    p.add_argument("--outdir", type=Path, default=None, help="run folder (default runs/<method>-<data folder name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--backend", choices=["torch", "triton"], default=None, help="kernels (default: triton on CUDA)")
    # Optimisation (DMD's CIFAR-10 AdamW settings).
    p.add_argument("--bs", type=int, default=392, help="global batch size (DMD CIFAR-10: 56 x 7 GPUs)")
    p.add_argument("--steps", type=int, default=100_000, help="iterations (critic updates; G every --ttur-th)")
    p.add_argument("--lr", type=float, default=5e-5, help="generator learning rate")
    p.add_argument("--fake-lr", type=float, default=None, help="fake score / head learning rate (default --lr)")
    p.add_argument("--warmup", type=int, default=None, help="linear learning-rate warm-up over each optimiser's "
                   "first updates (default: 500 for DMD2, as its paper; 0 for DMD)")
    p.add_argument("--wd", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--clip-grad", type=float, default=10.0, help="gradient-norm clipping of both updates (0: off)")
    p.add_argument("--ema", type=float, default=0.0, help="generator EMA decay per update (0: none, as DMD2)")
    # The methods.
    p.add_argument("--ttur", type=int, default=None, help="critic updates per generator update (DMD 1, DMD2 5)")
    p.add_argument("--reg-loss", choices=LOSSES, default="lpips",
                   help="DMD's regression loss (LPIPS, as the paper; missing weights are an error, never a silent L1)")
    p.add_argument("--lpips-vgg", type=str, default=None, help="VGG16 weights for --reg-loss lpips")
    p.add_argument("--lpips-lin", type=str, default=None, help="LPIPS v0.1 heads (vgg.pth) for --reg-loss lpips")
    p.add_argument("--reg-weight", type=float, default=0.25, help="DMD's regression weight lambda_reg")
    p.add_argument("--real", default=None, help="DMD2's real images: 'teacher' (the analytic teacher's exact "
                   "samples, its default), a .npz (arr_0 uint8 NHWC), a folder of PNGs (EDM dataset_tool), CIFAR-10's "
                   "cifar-10-batches-bin folder, or 'pairs' (the pairs' teacher images; caps G at the teacher's ODE); "
                   "required for EDM teachers")
    p.add_argument("--gen-gan-weight", type=float, default=3e-3, help="DMD2's generator GAN weight")
    p.add_argument("--critic-gan-weight", type=float, default=1e-2, help="DMD2's discriminator GAN weight")
    p.add_argument("--fake-score", choices=dmd.FAKE_KINDS, default="auto",
                   help="fake score: a copy of the EDM teacher network; the teacher plus a small zero-started DDPM++ "
                        "correction (residual); a small DDPM++ network alone (scratch); auto: copy for EDM teachers, "
                        "scratch for the analytic teacher")
    p.add_argument("--fake-warmup", type=int, default=None, help="critic-only iterations first (default: 0 for a "
                   "copy of the teacher, 1000 for a small network)")
    p.add_argument("--fake-channels", type=int, default=32, help="base width of the small fake-score network")
    p.add_argument("--init-fake", type=Path, default=None, help="start the fake score (and DMD2's head) from this "
                   "train_dmd.py checkpoint's weights, e.g. a warm-up-only run (--fake-warmup = --steps)")
    p.add_argument("--gen-sigmas", type=float_list, default=[80.0],
                   help="generator noise levels, descending (one value: a one-step generator)")
    p.add_argument("--backward-simulation", action="store_true", help="train multi-step generators on their rollout")
    # Outputs.
    p.add_argument("--eval-every", type=int, default=5000, help="metrics every this many iterations (0: never)")
    p.add_argument("--eval-seeds", default="1000000-1009999", help="seeds of the evaluation samples (EDM syntax)")
    p.add_argument("--eval-ref", type=int, default=10_000, help="exact reference samples of the analytic teacher")
    p.add_argument("--fid-ref", type=Path, default=None, help="FID reference statistics (.npz with mu, sigma)")
    p.add_argument("--fid-mode", choices=["clean", "legacy_tensorflow"], default="clean")
    add_common_arguments(p, sample_every=5000, ckpt_every=5000)
    args = p.parse_args(argv)
    if (args.generator is None) == (args.model is None):
        p.error("give exactly one of --generator CKPT (start from a distilled GET) and --model NAME (from scratch)")
    check_common_arguments(p, args)
    check_ranges(p, args, {"lr": NON_NEGATIVE, "fake_lr": NON_NEGATIVE, "warmup": NON_NEGATIVE, "wd": NON_NEGATIVE,
                           "clip_grad": NON_NEGATIVE, "fake_warmup": NON_NEGATIVE, "eval_every": NON_NEGATIVE,
                           "eval_ref": POSITIVE_INT})
    if not fake_channels_ok(args.fake_channels):
        p.error(f"--fake-channels must be at least 4 and give EDM's GroupNorm whole groups (e.g. 8, 16, 32, 64, 128), "
                f"got {args.fake_channels}")
    if args.eval_every:
        check_seeds_option(p, "--eval-seeds", args.eval_seeds)
    if args.fid_ref is not None and not args.fid_ref.is_file():
        p.error(f"--fid-ref {args.fid_ref}: no such file")
    try:
        dmd.DMDSettings(args.method, ttur=args.ttur, gen_sigmas=tuple(args.gen_sigmas),
                        backward_simulation=args.backward_simulation, reg_weight=args.reg_weight,
                        gen_gan_weight=args.gen_gan_weight, critic_gan_weight=args.critic_gan_weight)
    except ValueError as e:
        p.error(str(e))
    if args.real is not None and args.method != "dmd2":
        p.error(f"--real {args.real}: only DMD2's discriminator reads real data (--method dmd2)")
    if args.warmup is None:
        args.warmup = 500 if args.method == "dmd2" else 0  # resolved here, so options.json records it
    if args.outdir is None:
        args.outdir = Path("runs") / f"{args.method}-{args.data.resolve().name}"
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
