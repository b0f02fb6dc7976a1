"""Offline distillation of a GET on teacher noise/image pairs (docs/GET.md), on one process or torchrun DDP.

    python train/train_get.py --bs 256                                   # the paper's recipe on one device
    torchrun --nproc-per-node 8 train/train_get.py --bs 256              # 8 GPUs (or: python ... --nproc 8)
    python train/train_get.py --resume --outdir runs/...                 # continue a run exactly

Defaults are the paper's: GET-B/2, AdamW(lr 1e-4, betas (0.9, 0.999), weight decay 0), constant lr, EMA 0.9999 every
step, the fixed-point-correction loss over the 6 trajectory states (weights 0.8^(5-k), unnormalised sum) of the
per-state L1, 800k steps. The global batch is --bs on any number of ranks; each rank reads its slice of one global
permutation per epoch (get.data.EpochSampler).
"""

import argparse
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from get import dist
from get.data import EpochSampler, PairDataset, PairSettings, micro_batches
from get.images import save_image_grid
from get.losses import LOSSES, fp_correction, get_loss_fn
from get.models import GET_models, count_parameters, create_model
from get.seeds import draw_inputs, parse_seeds, rank_seed
from get.training.checkpoints import load_checkpoint, prepare_run_dir, record_options, save_checkpoint
from get.training.cli import (
    NON_NEGATIVE,
    POSITIVE_INT,
    UserError,
    add_common_arguments,
    blame,
    check_common_arguments,
    check_ranges,
    run_script,
)
from get.training.guards import NonFiniteGuard
from get.training.logs import StatsLogger, Throughput, plot_loss_curve
from get.training.modules import MethodWrapper, check_ddp_consistency, requires_grad, update_ema
from get.training.pairs import data_identity, resume_data

DEFAULT_DATA = "data/pairs/edm-cifar10-32x32-uncond-vp"  # data_gen/generate.py's default output folder

#################################################################################
#                                  Helpers                                      #
#################################################################################


def build_models(args, ds, device):
    """The trained model and its EMA copy (built anew, as torchdeq-normed modules cannot be deep-copied)."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run of this seed
    deq = {"deq": {"mem": True}} if args.mem else {}  # a GET option (the ViT baseline has no solve)
    model = create_model(args.model, input_size=ds.resolution, in_channels=ds.channels,
                         num_classes=ds.label_dim if ds.conditional else 0, backend=args.backend, **deq).to(device)
    model.check_finite = False  # the loop checks finiteness itself, once per step, on every rank alike
    ema = type(model)(**model.config).to(device)
    ema.load_state_dict(model.state_dict())
    requires_grad(ema, False)
    return model, ema.eval()


@torch.no_grad()
def grid_images(ema, seeds: list[int], settings: PairSettings, device) -> torch.Tensor:
    """EMA samples (n, C, R, R) of seeds, drawn as every script draws them (get.seeds): the pairs' own latents and
    labels for those seeds (their label policy and generator device), and each seed's z_0."""
    inputs = draw_inputs(seeds, ema, label_policy=settings.label_policy, rng_device=settings.rng_device,
                         device=device)
    return ema(inputs.latents, inputs.labels, z0=inputs.z0)


#################################################################################
#                                Training loop                                  #
#################################################################################


def main(args):
    device = dist.init(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.bs % world:
        raise UserError(f"--bs {args.bs} is not divisible by the world size {world}")
    per_rank = args.bs // world
    micro_bs = args.micro_bs or per_rank
    if per_rank % micro_bs:
        raise UserError(f"--micro-bs {micro_bs} does not divide the per-rank batch {per_rank} (--bs / world size)")
    accum = per_rank // micro_bs
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32

    # Data, model, optimiser.
    with blame("--data"):
        ds = PairDataset(args.data)
    if len(ds) < args.bs:
        raise UserError(f"--data {args.data}: {len(ds)} pairs, fewer than one batch (--bs {args.bs})")
    model, ema = build_models(args, ds, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, weight_decay=args.wd)
    with blame("--loss"):  # LPIPS: its weight files
        crit = get_loss_fn(args.loss, **({} if args.loss != "lpips" else
                                          dict(vgg_path=args.lpips_vgg, lin_path=args.lpips_lin)))
    if isinstance(crit, torch.nn.Module):
        crit = crit.to(device)
    sampler = EpochSampler(len(ds), rank, world, seed=args.seed, drop_last=True)
    # z_0 of the trajectories, for models that have one (a ViT draws nothing).
    z0_gen = torch.Generator(device).manual_seed(rank_seed(args.seed, rank)) if model.input_spec.z0_shape else None
    generators = {} if z0_gen is None else {"z0": z0_gen}
    guard = NonFiniteGuard(args.max_nonfinite)

    # Run folder; resume.
    identity = data_identity(ds)  # the pair set's, recorded in every checkpoint
    options = dict({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, world_size=world,
                   per_rank_batch=per_rank, accumulation=accum, model_config=model.config,
                   dataset=dict(identity, resolution=ds.resolution, channels=ds.channels,
                                label_dim=ds.label_dim, teacher=ds.teacher))
    with blame("--outdir"):
        run_dir, ckpt = prepare_run_dir(args.outdir, args.resume)
    step = 0
    if ckpt is not None:
        with blame("--resume"):
            meta = load_checkpoint(ckpt, {"model": model, "ema": ema}, {"opt": opt}, generators)
        step = meta["step"]
        # The same pair set (unless --allow-data-change); the sampler also continues exactly on another world size.
        options["data_change"] = resume_data(meta["state"], ds, sampler, args.allow_data_change)
        guard.load_state_dict(meta["state"]["guard"])
        if not meta["rng_restored"] and z0_gen is not None:  # another world size: fresh z_0 streams, deterministic
            z0_gen.manual_seed(rank_seed(args.seed + step, rank))
        dist.print0(f"Resumed from {ckpt} at step {step} (epoch {sampler.epoch}).")
    record_options(run_dir, options, ckpt)  # only once the start or resume is accepted
    kind = "conditional" if ds.conditional else "unconditional"
    dist.print0(f"GET {args.model}: {count_parameters(model, trainable_only=True):,} trainable parameters; "
                f"{len(ds):,} {kind} pairs "
                f"{ds.channels}x{ds.resolution}x{ds.resolution}; world {world} x micro-batch {micro_bs} x {accum} "
                f"accumulation = batch {args.bs}; run {run_dir}")

    ddp = MethodWrapper(model, "trajectory")
    if world > 1:
        ddp = DDP(ddp, device_ids=[device] if device.type == "cuda" else None)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    logger = StatsLogger(run_dir, start_step=step)
    meter = Throughput()
    data = micro_batches(ds, sampler, micro_bs, device)
    n_states = model.num_states
    sums = torch.zeros(2 + 2 * n_states, device=device, dtype=torch.float64)  # loss, grad norm, states, residuals
    n_ok = 0

    def save(step):
        check_ddp_consistency(model)
        state = dict(sampler=sampler.state_dict(), guard=guard.state_dict(), data=identity)
        save_checkpoint(run_dir, step, {"model": model, "ema": ema}, {"opt": opt}, state, generators, keep=args.keep)

    bar = tqdm(total=args.steps, initial=step, disable=not dist.is_main(), dynamic_ncols=True, desc="train")
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        states_sum = torch.zeros(n_states, device=device)
        resid_sum = torch.zeros(n_states, device=device)
        for i in range(accum):
            batch = next(data)
            labels = batch.get("label") if ds.conditional else None
            sync = i == accum - 1 or world == 1
            with (nullcontext() if sync else ddp.no_sync()), autocast:
                images, info = ddp(batch["noise"], labels, return_info=True, generator=z0_gen)
                loss, per_state = fp_correction(crit, [x.float() for x in images], batch["image"], gamma=args.gamma)
            (loss / accum).backward()
            loss_sum += loss.detach() / accum
            states_sum += per_state / accum
            if "abs_trace" in info:  # the fixed-point residuals of a GET (a ViT has no solve)
                resid_sum += info["abs_trace"].float().mean(dim=0) / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad if args.clip_grad > 0 else float("inf"))
        ok_local = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        ok = bool(dist.all_mean(ok_local.double()) == 1)  # one host sync per step: every rank takes the same branch
        if guard.check(ok, step + 1):
            opt.step()
            update_ema(ema, model, args.ema)
            sums += torch.cat([loss_sum[None], grad_norm[None], states_sum, resid_sum]).double()
            n_ok += 1
        else:
            if dist.is_main():
                bar.write(f"step {step + 1}: non-finite loss or gradient, step skipped ({guard.in_row} in a row)")
        opt.zero_grad(set_to_none=True)
        step += 1
        meter.update(args.bs)
        bar.update(1)

        # Logs, samples, checkpoints.
        if step % args.log_every == 0 or step == args.steps:
            stats = dict(lr=lr, img_per_s=meter.rate(), epoch=sampler.epoch, skipped=guard.total)
            if n_ok:  # means over the interval's finite steps (the same steps on every rank) and over ranks
                means = (dist.all_mean(sums) / n_ok).tolist()
                stats.update(loss=means[0], grad_norm=means[1], loss_last=means[1 + n_states])
                stats.update({f"loss_state{k + 1}": v for k, v in enumerate(means[2:2 + n_states])})
                if model.input_spec.z0_shape is not None:  # a model with an equilibrium solve
                    stats.update({f"residual{k + 1}": v for k, v in enumerate(means[2 + n_states:])})
                bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{stats['img_per_s']:.1f}")
            logger.log(step, stats)
            sums.zero_()
            n_ok = 0
        if step % args.ckpt_every == 0 or step == args.steps:  # before the grid: a failing grid loses no step
            save(step)
        if dist.is_main() and (step % args.sample_every == 0 or step == args.steps):
            grid = grid_images(ema, parse_seeds(args.grid_seeds), ds.settings, device)
            save_image_grid(grid, run_dir / "samples" / f"{step:07d}.png")
            plot_loss_curve(run_dir)
    bar.close()
    logger.close()
    dist.print0(f"Done: {step} steps in {run_dir}")
    dist.cleanup()


#################################################################################
#                                Command line                                   #
#################################################################################


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(DEFAULT_DATA), help="pair folder (data_gen/generate.py output)")
    p.add_argument("--outdir", type=Path, default=None, help="run folder (default runs/<model>-<data folder name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--model", choices=list(GET_models), default="GET-B/2")
    p.add_argument("--backend", choices=["torch", "triton"], default=None, help="kernels (default: triton on CUDA)")
    p.add_argument("--mem", action="store_true", help="gradient checkpointing of the equilibrium blocks")
    # Optimisation.
    p.add_argument("--bs", type=int, default=256, help="global batch size")
    p.add_argument("--micro-bs", type=int, default=None, help="per-rank micro-batch; accumulates to --bs")
    p.add_argument("--steps", type=int, default=800_000, help="optimiser steps")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps: lr * (step + 1) / warmup")
    p.add_argument("--wd", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay per step")
    p.add_argument("--clip-grad", type=float, default=0.0, help="gradient-norm clipping threshold (0: off)")
    p.add_argument("--loss", choices=LOSSES, default="l1", help="per-state loss of the fixed-point correction")
    p.add_argument("--gamma", type=float, default=0.8, help="fixed-point-correction weight base: gamma^(n-k-1)")
    p.add_argument("--lpips-vgg", type=str, default=None, help="VGG16 weights for --loss lpips")
    p.add_argument("--lpips-lin", type=str, default=None, help="LPIPS v0.1 heads (vgg.pth) for --loss lpips")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    add_common_arguments(p, sample_every=10_000, ckpt_every=10_000)
    args = p.parse_args(argv)
    check_common_arguments(p, args)
    check_ranges(p, args, {"micro_bs": POSITIVE_INT, "lr": NON_NEGATIVE, "warmup": NON_NEGATIVE, "wd": NON_NEGATIVE,
                           "clip_grad": NON_NEGATIVE, "gamma": NON_NEGATIVE})
    if args.outdir is None:
        args.outdir = Path("runs") / f"{args.model.replace('/', '-')}-{args.data.resolve().name}"
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
