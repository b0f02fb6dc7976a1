"""One-step samples from a trained GET: PNGs or an npz, FID, and held-out-pair metrics; one process or DDP.

    python train/sample.py --ckpt runs/GET-B-2-.../checkpoints/0800000 --seeds 0-49999 --npz samples.npz \\
        --fid cifar10 --fid-mode legacy_tensorflow                       # EDM's protocol (train statistics)
    python train/sample.py --ckpt runs/RUN --seeds 0-63 --outdir samples   # PNGs, EDM's layout
    python train/sample.py --ckpt runs/RUN --pairs data/pairs/held-out --teacher mixture-demo   # error vs the teacher

Every sample is a function of its seed only (get.seeds: EDM's per-seed generators for the latent and the class label,
and a per-seed stream for GET's z_0), so the images do not depend on --batch or the number of processes. With
--pairs, the pairs' stored noise and labels are the inputs (each seed's z_0 as always).

--ckpt takes a checkpoint folder, a run folder (its latest checkpoint), a model folder, or an official GET .pth
file; the EMA weights are used unless --no-ema.
"""

import argparse
import io
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from get import dist
from get.images import save_image_grid, save_png, to_uint8
from get.io import atomic_write_bytes, write_json
from get.models import GET
from get.seeds import draw_inputs, parse_seeds
from get.training.checkpoints import latest_checkpoint
from get.training.cli import POSITIVE_INT, UserError, blame, check_ranges, check_seeds_option, run_script
from get.training.pairs import nonfinite_seeds


def resolve_checkpoint(path: Path) -> Path:
    """A run folder → its latest checkpoint; anything else as given."""
    if path.is_dir() and (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise UserError(f"--ckpt {path}: the run has no complete checkpoint yet")
        return latest
    if not path.exists():
        raise UserError(f"--ckpt {path}: no such checkpoint")
    return path


@torch.no_grad()
def generate(model, seeds, label_policy, rng_device, device, pairs=None):
    """Samples (B, C, R, R) float32 and labels (B,) or None of a batch of seeds, drawn through get.seeds; with
    ``pairs`` (a batch of those seeds' pairs) their stored noise and labels are the inputs, with each seed's z_0."""
    inputs = draw_inputs(seeds, model, label_policy=label_policy, rng_device=rng_device, device=device)
    latents, labels = inputs.latents, inputs.labels
    if pairs is not None:
        latents, labels = pairs["noise"].to(device), None if "label" not in pairs else pairs["label"].to(device)
    return model(latents, labels, z0=inputs.z0).float(), labels


def main(args):
    device = dist.init(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    ckpt = resolve_checkpoint(args.ckpt)
    if args.fid is not None:  # fail before sampling when the FID assets are missing
        from get import metrics

        with blame("--fid"):
            metrics.inception_path()
    with blame("--ckpt"):
        model = GET.from_pretrained(ckpt, ema=not args.no_ema, map_location=device,
                                    **({"backend": args.backend} if args.backend else {})).eval()
    if args.pairs is not None:
        from get.data import PairDataset

        with blame("--pairs"):
            ds = PairDataset(args.pairs)
        bad, count = nonfinite_seeds(ds)  # a NaN pair would turn every metric into NaN
        if count:
            raise UserError(f"--pairs {args.pairs}: {count} of {len(ds)} pairs hold NaN or inf (seeds "
                            f"{', '.join(map(str, bad))}{', ...' if count > len(bad) else ''}); regenerate them")
        if (ds.channels, ds.resolution) != (model.in_channels, model.input_size):
            raise UserError(f"--pairs {args.pairs}: pairs are {ds.channels}x{ds.resolution}x{ds.resolution}, the "
                            f"model makes {model.in_channels}x{model.input_size}x{model.input_size}")
        total = len(ds)
    else:
        ds, all_seeds = None, parse_seeds(args.seeds)
        total = len(all_seeds)
    # The pairs' settings decide how their seeds are drawn (z_0 does not depend on them); else the command line's.
    label_policy, rng_device = (ds.settings.label_policy, ds.settings.rng_device) if ds else (args.labels,
                                                                                          args.rng_device)
    teacher = None
    if args.teacher is not None and dist.is_main():  # before sampling: a wrong name fails at once
        from get.teachers import load_teacher

        with blame("--teacher"):
            teacher = load_teacher(args.teacher)
    if args.fid is not None and not Path(args.fid).exists():
        with blame("--fid"):
            metrics.reference_stats_path(args.fid, model.input_size, args.fid_split, args.fid_mode)

    # EDM's split of the positions in the seed list (or the pair set): batches of at most --batch, i to rank i mod W.
    num_batches = max(math.ceil(total / (args.batch * world)), 1) * world
    rank_batches = np.array_split(np.arange(total), num_batches)[rank::world]
    keep = args.npz is not None or args.fid is not None or args.pairs is not None or args.grid is not None
    out_pos, out_seeds, out_images, out_labels = [], [], [], []
    for batch in tqdm(rank_batches, disable=not dist.is_main(), desc="sample", unit="batch"):
        if len(batch) == 0:
            continue
        pairs = ds.get_batch(batch.tolist()) if ds is not None else None
        seeds = pairs["seed"].tolist() if pairs is not None else [all_seeds[i] for i in batch]
        images, labels = generate(model, seeds, label_policy, rng_device, device, pairs)
        if args.outdir is not None:
            for seed, img in zip(seeds, to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()):
                save_png(img, args.outdir / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png")
        if keep:
            out_pos.append(torch.from_numpy(batch))
            out_seeds.append(torch.tensor(seeds))
            out_images.append(images.cpu())
            out_labels.append(labels.cpu() if labels is not None else torch.zeros(len(seeds), dtype=torch.int64))
    dist.barrier()
    if not keep:
        dist.print0(f"{total} PNGs in {args.outdir}")
        dist.cleanup()
        return None

    # Everything to rank 0 (our own processes: trusted objects), back in the order of the seed list or pair set.
    local = [torch.cat(x) if x else None for x in (out_pos, out_seeds, out_images, out_labels)]
    gathered = dist.all_gather_object(local)
    results = None
    if dist.is_main():
        parts = [g for g in gathered if g[0] is not None]
        pos, seeds, images, labels = (torch.cat([p[i] for p in parts]) for i in range(4))
        order = torch.argsort(pos)
        seeds, images, labels = seeds[order], images[order], labels[order]
        images_u8 = to_uint8(images).permute(0, 2, 3, 1).numpy()  # (N, R, R, C)
        results = {"checkpoint": str(ckpt), "ema": not args.no_ema, "n": len(seeds)}
        if args.npz is not None:
            buf = io.BytesIO()
            arrays = dict(images=images_u8, seeds=seeds.numpy())
            if model.num_classes:
                arrays["labels"] = labels.numpy()
            np.savez(buf, **arrays)
            atomic_write_bytes(args.npz, buf.getvalue())
            print(f"{len(seeds)} samples in {args.npz}")
        if args.grid is not None:
            save_image_grid(images[:args.grid_n], args.grid)
            print(f"grid of {min(args.grid_n, len(seeds))} samples in {args.grid}")
        if args.pairs is not None:
            targets = ds.get_batch(list(range(len(ds))))["image"]  # (N, C, R, R) the teacher's outputs
            mse = (images.double() - targets.double()).square().mean().item()
            mean_mse = (targets.double() - targets.double().mean(0)).square().mean().item()
            results.update(mse=mse, mse_data_mean=mean_mse, mse_ratio=mse / mean_mse)
            print(f"held-out pairs {args.pairs}: MSE vs the teacher {mse:.5f}; predicting the data mean "
                  f"{mean_mse:.5f}; ratio {mse / mean_mse:.3f}")
            if teacher is not None:
                from get.metrics import evaluate_mixture

                exact = evaluate_mixture(teacher, images.double(), targets=targets.double(),
                                         class_labels=labels if model.num_classes else None)
                results["mixture"] = exact
                print("exact metrics against the teacher: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in exact.items() if isinstance(v, (int, float))))
        if args.fid is not None:
            ref = dict(reference=args.fid) if Path(args.fid).exists() else dict(
                dataset=args.fid, dataset_res=model.input_size, dataset_split=args.fid_split)
            value = metrics.fid(images_u8, mode=args.fid_mode, device=device, **ref)
            results.update(fid=value, fid_mode=args.fid_mode, fid_reference=args.fid)
            print(f"FID ({args.fid_mode}, {len(seeds)} samples vs {args.fid}): {value:.3f}")
        if args.metrics is not None:
            write_json(args.metrics, results)
    dist.barrier()
    dist.cleanup()
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder, run folder, model folder or .pth")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights instead of the EMA")
    p.add_argument("--seeds", type=str, default="0-63", help="seeds in EDM syntax (ignored with --pairs)")
    p.add_argument("--labels", choices=["random", "balanced"], default="random",
                   help="class labels of a conditional model: drawn per seed (EDM) or seed mod classes")
    p.add_argument("--rng-device", choices=["cpu", "cuda"], default="cpu",
                   help="device of the per-seed generators (they decide the numbers; ignored with --pairs)")
    p.add_argument("--pairs", type=Path, default=None, help="held-out pair folder: sample its noise, report the MSE")
    p.add_argument("--teacher", type=str, default=None, help="with --pairs: the analytic teacher, for exact metrics")
    p.add_argument("--outdir", type=Path, default=None, help="write one PNG per seed here")
    p.add_argument("--npz", type=Path, default=None, help="write uint8 images (N, R, R, C), seeds, labels here")
    p.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the first --grid-n samples here")
    p.add_argument("--grid-n", type=int, default=64)
    p.add_argument("--fid", type=str, default=None,
                   help="FID against a data set's statistics by name (e.g. cifar10) or a stats/images path")
    p.add_argument("--fid-mode", choices=["clean", "legacy_tensorflow"], default="legacy_tensorflow")
    p.add_argument("--fid-split", default="train", help="split of the named data set's statistics")
    p.add_argument("--metrics", type=Path, default=None, help="write the numbers as JSON here")
    p.add_argument("--batch", type=int, default=128, help="samples per forward pass and process")
    p.add_argument("--backend", choices=["torch", "triton"], default=None)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--nproc", type=int, default=None, help="local worker processes to start (default: torchrun's)")
    args = p.parse_args(argv)
    check_ranges(p, args, {"batch": POSITIVE_INT, "grid_n": POSITIVE_INT, "nproc": POSITIVE_INT})
    if args.pairs is None:
        check_seeds_option(p, "--seeds", args.seeds)
    if args.teacher is not None and args.pairs is None:
        p.error("--teacher needs --pairs (the held-out pairs of that teacher)")
    if args.outdir is None and args.npz is None and args.fid is None and args.pairs is None and args.grid is None:
        p.error("nothing to do: give --outdir, --npz, --grid, --fid or --pairs")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
