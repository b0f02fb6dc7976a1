"""Generate noise/image pairs from a teacher with EDM's Heun sampler, on one or many processes, resumably.

Examples:
    python data_gen/generate.py --teacher mixture-demo --seeds 0-9999 --nproc 2     # CPU, analytic teacher
    python data_gen/generate.py --nproc 4                                            # the paper's 1M CIFAR-10 pairs
    torchrun --nproc-per-node 4 data_gen/generate.py                                 # the same, started by torchrun
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT data_gen/generate.py \\
        -- --nproc 4                                                                 # 2 nodes x 4 workers
    python data_gen/generate.py --teacher mixture-demo --seeds 0-9999 --verify      # check the shards

(torchrun's own parser takes ``--nproc`` for its ``--nproc-per-node``: after torchrun, put ``--`` before it.)

Pair k's random inputs are a function of seed k only (see get/seeds.py) and shard j always holds the same seeds, so
the folder is bit-identical for any number of processes at equal --batch and threads per process (kernels round by
batch size and thread count; README, "What is bit-identical"). Rerunning the same command after a crash keeps every
shard whose checksum matches the manifest and generates the rest; a complete data set is not rewritten. Bad input ends
with one line "generate.py: error: ..." and exit status 1 (2 for flags). Output format: get/data.py.
"""

import argparse
import math
import pickle
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from get import data, dist
from get.edm.sampler import check_sampler_settings, edm_sampler, sampler_sigma_range
from get.images import pair_grid, save_image_grid
from get.seeds import draw_inputs, parse_seeds
from get.teachers import load_teacher

# Rows are evaluated in groups of 8 (the last group padded): CPU kernels then take their vectorised path, never a
# scalar remainder loop for a few rows. This does not make a pair independent of the batch size: matrix and convolution
# kernels split their sums by batch size and thread count, so bits are reproducible only at equal --batch and threads.
ROW_GROUP = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nproc", type=int, default=None,
                   help="local worker processes to start per node (None: 1, or what torchrun started)")
    p.add_argument("--teacher", default="edm-cifar10-32x32-uncond-vp",
                   help="official EDM name or .pkl path, a converted teacher folder, or mixture[-demo][-cond]")
    p.add_argument("--seeds", default="0-999999", help="seed list in EDM syntax, e.g. 0-999,2000-2999")
    p.add_argument("--batch", type=int, default=256, help="pairs per teacher call and process (rounded down to a "
                   f"multiple of {ROW_GROUP})")
    p.add_argument("--outdir", default=None, help="output folder (None: data/pairs/<teacher>)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="pairs per shard file, part of the data set's layout (None: a function of the number of seeds, "
                        "see default_shard_size)")
    p.add_argument("--steps", type=int, default=18, help="sampler steps N (2N - 1 teacher calls per pair)")
    p.add_argument("--sigma-min", type=float, default=0.002, help="lowest noise level (clipped to the teacher's)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="highest noise level (clipped to the teacher's)")
    p.add_argument("--rho", type=float, default=7.0, help="time-step exponent of the Karras schedule")
    p.add_argument("--S-churn", type=float, default=0.0, help="stochasticity (0: the deterministic ODE map)")
    p.add_argument("--S-min", type=float, default=0.0, help="churn only for sigma >= S_min")
    p.add_argument("--S-max", type=float, default=float("inf"), help="churn only for sigma <= S_max")
    p.add_argument("--S-noise", type=float, default=1.0, help="scale of the churn noise")
    p.add_argument("--labels", choices=["random", "balanced"], default="random",
                   help="class labels of a conditional teacher: drawn from each seed's generator (EDM, the paper) "
                        "or seed mod label_dim")
    p.add_argument("--image-dtype", choices=["fp32", "fp16"], default="fp32", help="storage dtype of the images")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                   help="teacher arithmetic on CUDA: fp32 (TF32 off), tf32, or bf16 autocast")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA (one GPU per local rank) when available")
    p.add_argument("--grid", type=int, default=8, help="pairs shown in <outdir>/pairs.png (0: none)")
    p.add_argument("--verify", action="store_true",
                   help="only check every shard against the manifest and name the bad ones (exit status 1 if any)")
    # torchrun's parser claims `--nproc` (an abbreviation of its --nproc-per-node), so after torchrun it follows `--`;
    # this script has no positional arguments, so the separator carries no meaning here.
    args = p.parse_args([a for a in (sys.argv[1:] if argv is None else argv) if a != "--"])
    # Everything checkable without the teacher is checked here, before any worker starts or any file is written.
    for flag, value, least in (("--nproc", args.nproc, 1), ("--batch", args.batch, 1),
                               ("--shard-size", args.shard_size, 1), ("--grid", args.grid, 0)):
        if value is not None and value < least:
            p.error(f"{flag} must be >= {least}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available (use --device cpu)")
    try:
        check_sampler_settings(**sampler_kwargs(args), names=SAMPLER_FLAGS)
    except ValueError as e:
        p.error(str(e))
    try:
        data.shard_seeds(parse_seeds(args.seeds), args.shard_size or 1)  # syntax, bounds, duplicates
    except ValueError as e:
        p.error(f"--seeds: {str(e).removeprefix('seeds: ')}")
    return args


# The command-line flag of each sampler setting, for error messages.
SAMPLER_FLAGS = {"num_steps": "--steps", "sigma_min": "--sigma-min", "sigma_max": "--sigma-max", "rho": "--rho",
                 "S_churn": "--S-churn", "S_min": "--S-min", "S_max": "--S-max", "S_noise": "--S-noise"}


def sampler_kwargs(args) -> dict:
    """The sampler settings of the command line, as ``edm_sampler``'s keywords."""
    return {key: getattr(args, "steps" if key == "num_steps" else key) for key in SAMPLER_FLAGS}


def default_shard_size(num_seeds: int) -> int:
    """About 64 shards (so that many processes share the work), of 64 to 10,000 pairs: 10,000 for 1M seeds."""
    return min(10000, max(64, math.ceil(num_seeds / 64)))


def default_outdir(teacher: str) -> Path:
    """data/pairs/<teacher name>, the name without folders and .pkl."""
    return Path("data/pairs") / Path(teacher.rstrip("/")).name.removesuffix(".pkl")


def pair_settings(teacher, args, device: torch.device) -> data.PairSettings:
    """Everything besides the seeds that decides the pairs (compared on resume), from the command line."""
    sampler = data.SamplerSettings(**sampler_kwargs(args))
    # The generators live on the compute device, as in EDM: CPU and CUDA generators give different streams.
    return data.PairSettings.for_teacher(teacher, sampler, label_policy=args.labels, precision=args.precision,
                                         rng_device=device.type,
                                         image_dtype="float16" if args.image_dtype == "fp16" else "float32")


def set_precision(precision: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.benchmark = False  # the fastest algorithm may change from run to run


def sample_rows(teacher, seeds: list[int], settings: data.PairSettings, device: torch.device):
    """Latents (B, C, R, R) float32, images (B, C, R, R) float64 and labels (B,) int64 or None for a list of seeds."""
    inputs = draw_inputs(seeds, teacher, label_policy=settings.label_policy,
                         rng_device=settings.rng_device, device=device)
    # With S_churn = 0 the sampler multiplies its noise by zero; else each seed's generator continues (EDM's order).
    randn_like = inputs.noise.randn_like if settings.sampler.S_churn > 0 else torch.zeros_like
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
        images = edm_sampler(teacher, inputs.latents, inputs.labels, randn_like=randn_like,
                             **settings.sampler.kwargs())
    return inputs.latents, images, inputs.labels


def generate_shard(teacher, seeds: list[int], settings: data.PairSettings, batch: int, device: torch.device,
                   progress) -> dict[str, torch.Tensor]:
    """The tensors of one shard, computed in batches of ``batch`` rows (padded to a multiple of ROW_GROUP)."""
    step = max(ROW_GROUP, batch // ROW_GROUP * ROW_GROUP)
    image_dtype = {"float16": torch.float16, "float32": torch.float32}[settings.tensors["image"]["dtype"]]
    parts = []
    for i in range(0, len(seeds), step):
        chunk = seeds[i:i + step]
        padded = chunk + [chunk[-1]] * (-len(chunk) % ROW_GROUP)  # the padding rows are dropped below
        latents, images, labels = sample_rows(teacher, padded, settings, device)
        n = len(chunk)
        labels = None if labels is None else labels[:n].cpu()
        parts.append((latents[:n].cpu(), images[:n].to(image_dtype).cpu(), labels))  # rounded once, from float64
        progress(n)
    tensors = {"noise": torch.cat([p[0] for p in parts]), "image": torch.cat([p[1] for p in parts]),  # (n, C, R, R)
               "seed": torch.tensor(seeds, dtype=torch.int64)}
    if parts[0][2] is not None:
        tensors["label"] = torch.cat([p[2] for p in parts])  # (n,)
    return tensors


def verify_main(outdir: Path) -> int:
    """--verify: every rank checks its share of the shards; rank 0 names the bad ones. Returns their number."""
    manifest = data.read_manifest(outdir)
    indices = range(dist.get_rank(), len(manifest["shards"]), dist.get_world_size())
    bad = {}
    for part in dist.all_gather_object(data.verify(outdir, manifest, indices)):
        bad.update(part)
    for name in sorted(bad):
        dist.print0(f"BAD {outdir / name}: {bad[name]}")
    dist.print0(f"{len(manifest['shards']) - len(bad)} of {len(manifest['shards'])} shards good in {outdir}"
                + ("; rerun the generating command to regenerate the bad ones" if bad else ""))
    return len(bad)


def open_folder(outdir: Path, manifest_new: dict) -> dict:
    """Rank 0 opens or creates the folder's manifest; every rank gets it (or the same error)."""
    manifest = error = None
    if dist.is_main():
        try:
            manifest = data.open_manifest(outdir, manifest_new)
            data.remove_stale_temps(outdir)
        except (ValueError, OSError) as e:  # data.PairDataError is a ValueError
            error = e
    manifest, error = dist.broadcast_object((manifest, error))
    if error is not None:
        raise error
    return manifest


def check_existing(outdir: Path, manifest: dict) -> list[int]:
    """Verifies the recorded shards (split over ranks); returns the shards left to generate, bad ones included."""
    rank, world = dist.get_rank(), dist.get_world_size()
    recorded = [k for k, s in enumerate(manifest["shards"]) if s["sha256"] is not None]
    bad = {}
    for part in dist.all_gather_object(data.verify(outdir, manifest, recorded[rank::world])):
        bad.update(part)
    for name in sorted(bad):
        dist.print0(f"{outdir / name}: {bad[name]}; regenerating it")
        manifest["shards"][[s["file"] for s in manifest["shards"]].index(name)]["sha256"] = None
    if bad:
        manifest["complete"] = False
        if dist.is_main():
            data.write_manifest(outdir, manifest)
    return [k for k, s in enumerate(manifest["shards"]) if s["sha256"] is None]


def main(args) -> int:
    device = dist.init(None if args.device == "auto" else args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    outdir = Path(args.outdir) if args.outdir else default_outdir(args.teacher)
    if args.verify:
        bad = verify_main(outdir)
        dist.cleanup()
        return 1 if bad else 0

    set_precision(args.precision)
    seeds = parse_seeds(args.seeds)
    if not dist.is_main():
        dist.barrier()  # rank 0 loads (and maybe downloads) the teacher first
    teacher = load_teacher(args.teacher, device)
    if dist.is_main():
        dist.barrier()
    sampler_sigma_range(teacher, args.sigma_min, args.sigma_max, names=SAMPLER_FLAGS)  # before anything is written
    shard_size = args.shard_size or default_shard_size(len(seeds))
    plan = data.shard_seeds(seeds, shard_size)
    settings = pair_settings(teacher, args, device)
    manifest = open_folder(outdir, data.new_manifest(settings, seeds, shard_size))
    pending = check_existing(outdir, manifest)
    if not pending:  # complete and verified: nothing is rewritten (the folder may be read-only)
        dist.print0(f"{outdir}: complete, all {len(plan)} shards verified; nothing to do")
        if dist.is_main():
            write_grid(outdir, manifest, teacher, args.grid)
        dist.barrier()
        dist.cleanup()
        return 0
    kept = len(plan) - len(pending)
    dist.print0(f"{outdir}: {len(plan)} shards of up to {shard_size} pairs; {kept} done and verified, "
                f"{len(pending)} to generate on {world} process(es)")

    todo = sum(len(plan[k]) for k in pending)
    done, start = 0, time.time()
    # Closed on errors too, so that an error message starts on its own line.
    with tqdm(total=todo, unit="pair", disable=not dist.is_main(), dynamic_ncols=True, smoothing=0.1) as bar:
        for first in range(0, len(pending), world):
            active = min(world, len(pending) - first)  # ranks with a shard this round
            k = pending[first + rank] if rank < active else None
            record = None
            if k is not None:
                # Rank 0 sees its own batches only: count them for every active rank (corrected after the round).
                tensors = generate_shard(teacher, plan[k], settings, args.batch, device,
                                         lambda n, w=active: bar.update(min(n * w, todo - bar.n)))
                record = data.write_shard(outdir, manifest, k, tensors)
            records = [r for r in dist.all_gather_object(record) if r is not None]
            data.record_shards(manifest, records)
            if dist.is_main():
                data.write_manifest(outdir, manifest)
            done += sum(r["count"] for r in records)
            bar.n = done
            bar.refresh()
    elapsed = time.time() - start

    if dist.is_main():
        summary(outdir, manifest, teacher, args, device, done, elapsed, world, kept)
    dist.barrier()
    dist.cleanup()
    return 0


def summary(outdir: Path, manifest: dict, teacher, args, device: torch.device, done: int, elapsed: float, world: int,
            kept: int) -> None:
    settings = manifest["settings"]
    rate = done / elapsed if elapsed > 0 else math.nan
    print(f"{outdir}: {settings['num_pairs']} pairs in {len(manifest['shards'])} shards, "
          f"{'complete' if manifest['complete'] else 'INCOMPLETE'}")
    print(f"  this run: {done} pairs in {elapsed:.1f} s = {rate:.1f} pairs/s on {world} process(es) "
          f"({rate / world:.1f} per process, batch {args.batch}, {device}); {kept} shards kept")
    print(f"  teacher {settings['teacher']['name']} (sha256 {settings['teacher']['sha256'][:16]}...), "
          f"{args.steps} steps ({2 * args.steps - 1} teacher calls per pair), precision {args.precision}, "
          f"images {settings['tensors']['image']['dtype']}")
    write_grid(outdir, manifest, teacher, args.grid)


def write_grid(outdir: Path, manifest: dict, teacher, grid: int) -> None:
    """<outdir>/pairs.png (noise | image) of the first ``grid`` pairs of a complete data set, unless it exists."""
    path = outdir / "pairs.png"
    if grid > 0 and manifest["complete"] and teacher.channels in (1, 3) and not path.exists():
        n = min(grid, manifest["settings"]["num_pairs"])
        pairs = data.PairDataset(outdir).get_batch(range(n))
        try:
            save_image_grid(pair_grid(pairs["noise"], pairs["image"]), path, nrow=2 * min(4, n))
        except OSError as e:  # a preview only: a read-only data set stays usable
            print(f"  {path} not written: {e.strerror or e}")
            return
        print(f"  {n} pairs (noise | image) in {path}")


# Bad input (a flag, a file, a folder): one line on stderr and exit status 1, no traceback. data.PairDataError is a
# ValueError; crafted teacher files raise UnpicklingError.
USER_ERRORS = (ValueError, OSError, pickle.UnpicklingError)

if __name__ == "__main__":
    cli = parse_args()
    try:
        raise SystemExit(dist.launch(main, cli.nproc, cli, user_errors=USER_ERRORS))
    except (*USER_ERRORS, dist.WorkerError) as e:
        raise SystemExit(f"generate.py: error: {e}") from None
