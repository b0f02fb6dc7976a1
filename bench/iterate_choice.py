"""Which fixed-point iterate a GET returns, and what it costs on the analytic teacher (docs/DISTILL.md).

    python bench/iterate_choice.py runs/RUN/checkpoints/0000300 --seeds 1000000-1004999

Evaluation (GET.forward, eval_select="lowest", the paper) keeps each sample's lowest-residual iterate of
eval_f_max_iter fixed-point steps; training, offline and DMD alike, reads trajectory()[-1], the last one. This prints
how often forward selects each iterate (info['nstep']) and the exact metrics (get.metrics.MixtureEvaluator) of the
selected and of the last iterates on the same seeds (inputs drawn through get.seeds as every script draws them).
"""

import argparse
import json

import torch

from get.metrics import MixtureEvaluator
from get.models import GET
from get.seeds import draw_inputs, parse_seeds
from get.teachers import load_teacher

METRICS = ("fd_pixel", "fd_feature", "precision", "mode_tv")


@torch.no_grad()
def measure(model: GET, teacher, seeds: list[int], n_ref: int = 10_000, batch: int = 500) -> dict:
    """{'nstep_shares': {k: share}, 'selected': metrics, 'last': metrics} of `model` on `seeds` (CPU)."""
    model = model.eval()
    model.set_deq_options(eval_select="lowest")  # forward: the paper's selection, whatever the saved config says
    selected, last, nsteps, labels = [], [], [], []
    for i in range(0, len(seeds), batch):
        inputs = draw_inputs(seeds[i:i + batch], model)
        x, info = model(inputs.latents, inputs.labels, z0=inputs.z0, return_info=True)
        selected.append(x)
        nsteps.append(info["nstep"])
        last.append(model.trajectory(inputs.latents, inputs.labels, z0=inputs.z0)[-1])
        labels.append(inputs.labels)
    nstep = torch.cat(nsteps)
    class_labels = torch.cat(labels) if teacher.label_dim else None
    evaluator = MixtureEvaluator(teacher, n_ref=n_ref)
    result = {"nstep_shares": {k: float((nstep == k).double().mean())
                               for k in range(1, model.deq_options["eval_f_max_iter"] + 1)}}
    for name, xs in (("selected", selected), ("last", last)):
        metrics = evaluator(torch.cat(xs), class_labels=class_labels)
        result[name] = {k: metrics[k] for k in METRICS}
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a GET checkpoint folder (train_get.py / train_dmd.py output)")
    p.add_argument("--teacher", default="mixture-demo", help="the analytic teacher the GET was distilled from")
    p.add_argument("--seeds", default="1000000-1004999", help="evaluation seeds (EDM syntax)")
    p.add_argument("--eval-ref", type=int, default=10_000, help="exact reference samples")
    p.add_argument("--no-ema", action="store_true", help="the checkpoint's raw weights instead of its EMA")
    args = p.parse_args(argv)
    model = GET.from_pretrained(args.checkpoint, ema=not args.no_ema)
    result = measure(model, load_teacher(args.teacher, "cpu"), parse_seeds(args.seeds), args.eval_ref)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
