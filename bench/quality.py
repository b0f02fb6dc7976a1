"""Sample quality on the analytic teacher: pairs -> a small GET -> one table of exact metrics.

    python bench/quality.py                                               # about 10 min on a quiet 2-core CPU
    python bench/quality.py --model GET-S/2 --pairs 100000 --steps 20000 --bs 256 --n-eval 10000 --device cuda

Stages, each run as a user would (the scripts' own command lines, in subprocesses); a rerun with the same --workdir
reuses what is there (generate.py keeps verified shards, train_get.py resumes from the latest checkpoint):
  1. data_gen/generate.py --teacher T --seeds 0-(P-1)        noise/image pairs of the teacher's 18-step Heun ODE
  2. train/train_get.py --data <pairs> --model M ...          offline distillation of a GET (EMA weights evaluated)
  3. evaluation on E held-out seeds P..P+E-1 (never seen in training) with get.metrics.MixtureEvaluator

Rows of the table:
  exact samples    samples of the mixture itself: the finite-sample floor of every metric at this n (no MSE: unpaired)
  teacher ODE      the teacher's Heun sampler with the data set's settings (18 steps = 35 evaluations); its outputs
                   are the targets of the MSE column, so its MSE is 0 by construction
  GET              the distilled one-step generator (1 network evaluation = 6 fixed-point iterations)
  data mean        every sample is the mean of the training images
  nearest pair     the training image whose noise is nearest (L2) to the held-out noise (same class if conditional)

Columns: network evaluations per sample, wall time to produce the E samples (and per sample), and the exact metrics
of get.metrics.MixtureEvaluator (FD in pixel space against the exact moments, FD in a fixed random-feature space,
mean exact log-density per dimension, precision, mode-share total variation, modes covered, MSE against the ODE).
The table is printed as Markdown and written with every number to <workdir>/quality.json.
"""

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from get import metrics
from get.data import PairDataset
from get.edm.sampler import edm_sampler
from get.images import save_image_grid
from get.io import write_json
from get.mixture import MIXTURE_SPECS
from get.models import GET, GET_models, ViT
from get.seeds import SeedInputs, draw_inputs
from get.teachers import load_teacher
from get.training.checkpoints import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NONE = "—"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", choices=list(MIXTURE_SPECS), default="mixture-demo", help="analytic teacher preset")
    p.add_argument("--pairs", type=int, default=4000, help="training pairs (seeds 0..pairs-1)")
    p.add_argument("--n-eval", type=int, default=1000, help="held-out seeds evaluated (pairs..pairs+n_eval-1)")
    p.add_argument("--model", choices=list(GET_models), default="GET-XXS/2")
    p.add_argument("--steps", type=int, default=1000, help="training steps")
    p.add_argument("--bs", type=int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay per step (short runs need a short memory)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="for every stage")
    p.add_argument("--nproc", type=int, default=1, help="processes for generation and training")
    p.add_argument("--gen-batch", type=int, default=500, help="pairs per teacher call in generation")
    p.add_argument("--eval-batch", type=int, default=500, help="samples per network call in evaluation")
    p.add_argument("--n-ref", type=int, default=10_000, help="exact reference samples of the feature-space FD")
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder of pairs, run and quality.json (default runs/quality/<teacher>-<model>-p<pairs>)")
    args = p.parse_args(argv)
    for name in ("pairs", "n_eval", "steps", "bs", "nproc", "gen_batch", "eval_batch", "n_ref"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.n_eval < 2:
        p.error("--n-eval must be >= 2 (covariances)")
    if args.bs > args.pairs:
        p.error(f"--bs {args.bs} is larger than --pairs {args.pairs}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.workdir is None:
        args.workdir = Path("runs/quality") / f"{args.teacher}-{args.model.replace('/', '-')}-p{args.pairs}"
    return args


def run_stage(name: str, cmd: list[str]) -> float:
    """Runs one script as a subprocess (output shown live); returns its wall time in seconds."""
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *cmd], cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed with exit status {done.returncode}: {' '.join(cmd)}")
    return time.perf_counter() - start


def generate_cmd(args, pairs_dir: Path) -> list[str]:
    return ["data_gen/generate.py", "--teacher", args.teacher, "--seeds", f"0-{args.pairs - 1}", "--outdir",
            str(pairs_dir), "--batch", str(args.gen_batch), "--device", args.device, "--nproc", str(args.nproc)]


def train_cmd(args, pairs_dir: Path, run_dir: Path) -> list[str]:
    return ["train/train_get.py", "--data", str(pairs_dir), "--outdir", str(run_dir), "--resume", "--model",
            args.model, "--steps", str(args.steps), "--bs", str(args.bs), "--lr", str(args.lr), "--warmup",
            str(args.warmup), "--ema", str(args.ema), "--seed", str(args.seed), "--device", args.device, "--nproc",
            str(args.nproc), "--log-every", str(max(1, args.steps // 20)), "--sample-every", str(args.steps),
            "--ckpt-every", str(max(1, args.steps // 4)), "--grid-seeds", "0-63"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_batches(fn, inputs: SeedInputs, batch: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """fn(latents, labels, z0) over batches of the seeds' inputs, concatenated on the CPU in float64, and the wall
    time of the calls (after one warm-up call)."""
    take = lambda t, a, b: None if t is None else t[a:b]
    batches = [(inputs.latents[i:i + batch], take(inputs.labels, i, i + batch), take(inputs.z0, i, i + batch))
               for i in range(0, len(inputs.seeds), batch)]
    with torch.no_grad():
        fn(*(take(x, 0, 2) for x in batches[0]))  # warm-up: lazy init, kernel selection
        _sync(device)
        start = time.perf_counter()
        outs = [fn(*b) for b in batches]
        _sync(device)
    return torch.cat([o.double().cpu() for o in outs]), time.perf_counter() - start


def one_step_samples(model, inputs: SeedInputs, batch: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """The model's samples of the seeds (get.seeds: each seed's latent, label and z_0), and their wall time."""
    return timed_batches(lambda z, y, z0: model(z, y, z0=z0), inputs, batch, device)


def training_data(ds: PairDataset, batch: int = 4096):
    """All training noise (N, D), images mean (C, R, R) and labels (N,) or None, read in batches."""
    noise, labels, image_sum = [], [], torch.zeros(ds.channels, ds.resolution, ds.resolution, dtype=torch.float64)
    for start in range(0, len(ds), batch):
        b = ds.get_batch(range(start, min(start + batch, len(ds))))
        noise.append(b["noise"].reshape(len(b["noise"]), -1))
        image_sum += b["image"].double().sum(0)
        labels.append(b.get("label"))
    return torch.cat(noise), image_sum / len(ds), (torch.cat(labels) if ds.conditional else None)


def nearest_pair(ds: PairDataset, train_noise, train_labels, noise, labels, batch: int = 4096) -> torch.Tensor:
    """Index of the training pair with the nearest noise (L2; among the same class when conditional), (E,)."""
    q = noise.reshape(len(noise), -1).double()  # (E, D)
    best_d = torch.full((len(q),), float("inf"), dtype=torch.float64)
    best_i = torch.zeros(len(q), dtype=torch.int64)
    for start in range(0, len(train_noise), batch):
        t = train_noise[start:start + batch].double()  # (T, D)
        d = (q * q).sum(1, keepdim=True) + (t * t).sum(1)[None] - 2 * q @ t.T  # (E, T) squared distances
        if labels is not None:
            d[labels[:, None] != train_labels[None, start:start + batch]] = float("inf")
        d_min, i_min = d.min(dim=1)
        better = d_min < best_d
        best_d[better], best_i[better] = d_min[better], i_min[better] + start
    return best_i


def evaluate(args, pairs_dir: Path, run_dir: Path) -> list[dict]:
    device = torch.device(args.device)
    teacher = load_teacher(args.teacher, device)
    ds = PairDataset(pairs_dir)
    settings = ds.settings  # the held-out seeds are drawn as the pairs were (label policy, generator device)
    seeds = range(args.pairs, args.pairs + args.n_eval)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise SystemExit(f"{run_dir}: no checkpoint; did training fail?")
    cls = ViT if args.model.startswith("ViT") else GET
    model = cls.from_pretrained(ckpt, ema=True, map_location=device).eval()
    inputs = draw_inputs(seeds, model, label_policy=settings.label_policy, rng_device=settings.rng_device,
                         device=device)
    noise, labels = inputs.latents, inputs.labels
    labels_cpu = None if labels is None else labels.cpu()

    print(f"\n== evaluation: {args.n_eval} held-out seeds {seeds.start}-{seeds.stop - 1} on {device}", flush=True)
    evaluator = metrics.MixtureEvaluator(teacher, n_ref=args.n_ref)
    rows = []

    def add(method: str, nfe, samples: torch.Tensor, seconds: float | None, targets=None):
        out = evaluator(samples, targets=targets, class_labels=labels_cpu)
        rows.append(dict(method=method, nfe=nfe, seconds=seconds, **out))
        print(f"  {method}: done", flush=True)

    # Exact samples (same classes as the held-out seeds when conditional).
    start = time.perf_counter()
    exact, _ = teacher.sample(args.n_eval, generator=torch.Generator(device).manual_seed(args.seed + 1),
                              class_labels=labels)
    add("exact samples", NONE, exact.cpu(), time.perf_counter() - start)

    # The teacher's ODE: the targets.
    steps = settings.sampler.num_steps
    ode = lambda z, y, z0: edm_sampler(teacher, z, y, randn_like=torch.zeros_like, **settings.sampler.kwargs())
    targets, seconds = timed_batches(ode, inputs, args.eval_batch, device)
    add(f"teacher ODE ({steps} Heun steps)", 2 * steps - 1, targets, seconds, targets)

    # The GET (EMA weights of the latest checkpoint).
    samples, seconds = one_step_samples(model, inputs, args.eval_batch, device)
    add(f"{args.model} (EMA, step {int(ckpt.name)})", 1, samples, seconds, targets)

    # Trivial baselines from the training pairs.
    start = time.perf_counter()
    train_noise, image_mean, train_labels = training_data(ds)
    mean_samples = image_mean.expand(args.n_eval, -1, -1, -1)
    add("data mean", 0, mean_samples, time.perf_counter() - start, targets)
    start = time.perf_counter()
    idx = nearest_pair(ds, train_noise, train_labels, noise.cpu(), labels_cpu)
    nearest = ds.get_batch(idx.tolist())["image"]
    add("nearest training pair", 0, nearest, time.perf_counter() - start, targets)

    # One picture for people: the same held-out seeds through the teacher's ODE, the GET, and the nearest pair.
    k = min(16, args.n_eval)
    rows_img = torch.cat([targets[:k], samples[:k], nearest[:k].double()]).float()  # (3k, C, R, R)
    zoom = max(1, 64 // rows_img.shape[-1])  # nearest-neighbour upscaling so small images are visible
    save_image_grid(rows_img.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2), args.workdir / "compare.png",
                    nrow=k)
    return rows


def _fmt(x, spec: str) -> str:
    return NONE if x is None or x == NONE else format(x, spec)


def table(rows: list[dict], n_eval: int) -> str:
    cond = "class_accuracy" in rows[0]
    head = ["method", "NFE/sample", "wall s", "ms/sample", "FD pixel", "FD feature", "log p /dim", "precision",
            "mode TV", "modes", "MSE vs ODE"] + (["class acc."] if cond else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        k = len(r["mode_shares"])
        cells = [r["method"], str(r["nfe"]), _fmt(r["seconds"], ".2f"),
                 _fmt(None if r["seconds"] is None else 1000 * r["seconds"] / n_eval, ".3f"),
                 _fmt(r["fd_pixel"], ".4g"), _fmt(r["fd_feature"], ".4g"), _fmt(r["log_prob"], ".3f"),
                 _fmt(r["precision"], ".3f"), _fmt(r["mode_tv"], ".3f"), f"{r['modes_covered']}/{k}",
                 _fmt(r.get("mse"), ".4g")] + ([_fmt(r["class_accuracy"], ".3f")] if cond else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    pairs_dir, run_dir = args.workdir / "pairs", args.workdir / "run"
    stage_seconds = {"generate": run_stage("generate pairs", generate_cmd(args, pairs_dir)),
                     "train": run_stage("train GET", train_cmd(args, pairs_dir, run_dir))}
    start = time.perf_counter()
    rows = evaluate(args, pairs_dir, run_dir)
    stage_seconds["evaluate"] = time.perf_counter() - start

    command = "python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    about = (f"{command}\nteacher {args.teacher}, {args.pairs} pairs, {args.model} {args.steps} steps (bs {args.bs}, "
             f"lr {args.lr}, EMA {args.ema}), {args.n_eval} held-out seeds, device {args.device} ({cpu}), "
             f"torch {torch.__version__}, {when}\nstage wall times (s, with start-up; a rerun reuses finished stages): "
             + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items()))
    text = table(rows, args.n_eval)
    print(f"\n{about}\n\n{text}\n")
    write_json(args.workdir / "quality.json", dict(command=command, args={k: str(v) for k, v in vars(args).items()},
                                                   date=when, torch=torch.__version__, stage_seconds=stage_seconds,
                                                   rows=rows))
    w = args.workdir
    print(f"outputs in {w}/:\n"
          f"  compare.png   held-out seeds: teacher ODE (top), GET one step (middle), nearest pair (bottom)\n"
          f"  quality.json  the table above as JSON\n"
          f"  pairs/        the training pairs (pairs.png: noise | image)\n"
          f"  run/          the GET run: loss.png, samples/*.png (EMA grid), stats.jsonl, checkpoints/")


if __name__ == "__main__":
    main()
