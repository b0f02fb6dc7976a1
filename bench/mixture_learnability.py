"""How learnable is the noise -> image map of a Gaussian-mixture teacher?

For each candidate configuration: draw pairs (z, x) with the 18-step deterministic Heun sampler (z unit Gaussian, per
seed), then fit on n_train pairs and report on n_test held-out pairs the fraction of variance explained,
R^2 = 1 - MSE / Var(x), of
  * ridge linear regression x ~ A z + b (closed form, float64), and
  * a small MLP (D -> 512 -> 512 -> D, SiLU, Adam 1e-3, batch 256, --mlp-steps steps) predicting x from z,
and the mean max-responsibility at sigma = 0.002 of the teacher outputs (how "decided" each image is).
A smooth map (high linear / MLP R^2) is what a small one-step generator can learn on a CPU in minutes; a map with
many well-separated modes jumps between basins and is learnt slowly.

Measured on the shared 2-core CPU of the development machine (torch 2.14.1, other jobs running, so the seconds are
noisy), with the defaults (--n-train 2000 --n-test 500 --mlp-steps 1000 --threads 1), 2026-11-22:

| config | D | K | linear R^2 | MLP R^2 | mean max resp. |
|---|---|---|---|---|---|
| demo (factor_sharing 1.0: the preset) | 768 | 4 | 0.790 | 0.812 | 1.000 |
| demo-unshared (factor_sharing 0) | 768 | 4 | 0.219 | 0.411 | 1.000 |
| demo-shared-0.75 | 768 | 4 | 0.581 | 0.658 | 1.000 |
| demo-k1 (one Gaussian: the map is affine) | 768 | 1 | 1.000 | 0.959 | 1.000 |
| demo-k2 | 768 | 2 | 0.879 | 0.857 | 1.000 |
| demo-k10-unshared | 768 | 10 | 0.123 | 0.270 | 1.000 |
| demo-small-means (mean_scale 0.2) | 768 | 4 | 0.887 | 0.877 | 1.000 |
| demo-separated-unshared (mean 0.5, factors 0.2) | 768 | 4 | 0.266 | 0.451 | 1.000 |
| demo-overlapping-unshared (mean 0.2, factors 0.4) | 768 | 4 | 0.246 | 0.391 | 1.000 |
| default (2000 pairs < D: the ridge overfits) | 3072 | 10 | -0.596 | 0.132 | 1.000 |
| default-shared-0.5 | 3072 | 10 | -0.405 | 0.172 | 1.000 |

The default preset stays unshared: a CIFAR-like hard target (10 classes with their own modes of variation).
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from get.edm.sampler import edm_sampler
from get.mixture import MixtureTeacher
from get.seeds import draw_inputs

CANDIDATES = {
    "demo": dict(preset="demo"),
    "demo-unshared": dict(preset="demo", factor_sharing=0.0),
    "demo-shared-0.75": dict(preset="demo", factor_sharing=0.75),
    "demo-k1": dict(preset="demo", num_components=1),
    "demo-k2": dict(preset="demo", num_components=2),
    "demo-k10-unshared": dict(preset="demo", num_components=10, factor_sharing=0.0),
    "demo-small-means": dict(preset="demo", mean_scale=0.2),
    "demo-separated-unshared": dict(preset="demo", mean_scale=0.5, factor_scale=0.2, factor_sharing=0.0),
    "demo-overlapping-unshared": dict(preset="demo", mean_scale=0.2, factor_scale=0.4, factor_sharing=0.0),
    "default": dict(preset="default"),
    "default-shared-0.5": dict(preset="default", factor_sharing=0.5),
}


def make_pairs(teacher: MixtureTeacher, seeds: range, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    zs, xs = [], []
    for start in range(seeds.start, seeds.stop, batch):
        z = draw_inputs(range(start, min(start + batch, seeds.stop)), teacher).latents
        xs.append(edm_sampler(teacher, z).reshape(z.shape[0], -1))
        zs.append(z.double().reshape(z.shape[0], -1))
    return torch.cat(zs), torch.cat(xs)


def r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    return 1 - float((pred - target).square().mean() / (target - target.mean(0)).square().mean())


def ridge(z_train, x_train, z_test, x_test, lam: float = 1e-3) -> float:
    Z = torch.cat([z_train, torch.ones(len(z_train), 1, dtype=z_train.dtype)], 1)
    A = torch.linalg.solve(Z.T @ Z + lam * len(Z) * torch.eye(Z.shape[1], dtype=Z.dtype), Z.T @ x_train)
    return r2(torch.cat([z_test, torch.ones(len(z_test), 1, dtype=z_test.dtype)], 1) @ A, x_test)


def mlp(z_train, x_train, z_test, x_test, steps: int, seed: int = 0) -> float:
    torch.manual_seed(seed)
    D = z_train.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(D, 512), torch.nn.SiLU(), torch.nn.Linear(512, 512), torch.nn.SiLU(),
                              torch.nn.Linear(512, D))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    zt, xt = z_train.float(), x_train.float()
    for _ in range(steps):
        idx = torch.randint(len(zt), (256,))
        loss = F.mse_loss(net(zt[idx]), xt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return r2(net(z_test.float()).double(), x_test)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--mlp-steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("| config | D | K | linear R^2 | MLP R^2 | mean max resp. | pairs s | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        opts = dict(CANDIDATES[name])
        teacher = MixtureTeacher.preset(opts.pop("preset"), **opts)
        t0 = time.time()
        z, x = make_pairs(teacher, range(args.n_train + args.n_test))
        t_pairs = time.time() - t0
        resp = teacher.responsibilities(x.reshape(-1, teacher.channels, teacher.resolution, teacher.resolution),
                                        sigma=0.002).max(1).values.mean()
        n = args.n_train
        t0 = time.time()
        lin = ridge(z[:n], x[:n], z[n:], x[n:])
        nonlin = mlp(z[:n], x[:n], z[n:], x[n:], args.mlp_steps)
        print(f"| {name} {json.dumps(opts)} | {teacher.dim} | {teacher.num_components} | {lin:.3f} | {nonlin:.3f} | "
              f"{float(resp):.3f} | {t_pairs:.0f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
