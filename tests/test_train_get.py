"""train/train_get.py end to end on tiny pair sets: exact resume, config refusal, non-finite skips, 2-process DDP."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pair_sets import make_pairs
from PIL import Image
from safetensors.torch import load_file

from get.data import EpochSampler
from get.losses import fp_correction, l1_loss
from get.models import GET
from get.seeds import draw_inputs, rank_seed
from get.training.checkpoints import CheckpointMismatchError
from get.training.cli import UserError
from get.training.guards import TrainingDivergedError
from get.training.logs import read_stats
from get.training.pairs import data_identity

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "train_get.py"
_spec = importlib.util.spec_from_file_location("train_get", SCRIPT)
train_get = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_get)
_spec = importlib.util.spec_from_file_location("sample", REPO / "train" / "sample.py")
sample = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample)


def run(data, outdir, *extra, steps=4):
    args = train_get.parse_args(["--data", str(data), "--outdir", str(outdir), "--model", "GET-XXS/2", "--bs", "8",
                                 "--steps", str(steps), "--log-every", "1", "--sample-every", "100",
                                 "--ckpt-every", "2", "--grid-seeds", "0-3", *extra])
    train_get.main(args)
    return read_stats(outdir)


def _tensors(path):
    return load_file(str(path))


def test_resume_is_exact_and_outputs(tmp_path):
    data = make_pairs(tmp_path / "pairs")
    full = run(data, tmp_path / "full", steps=6)
    # An interrupted run: checkpoints at 2 and 4, the one at 4 lost in the crash, resumed from 2 to the end.
    part = tmp_path / "part"
    run(data, part, steps=4)
    for f in (part / "checkpoints" / "0000004").iterdir():
        f.unlink()
    (part / "checkpoints" / "0000004").rmdir()
    resumed = run(data, part, "--resume", steps=6)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        for key in ["loss", "grad_norm", "residual6"] + [f"loss_state{k}" for k in range(1, 7)]:
            assert a[key] == b[key], (a["step"], key)
    for name in ("model.safetensors", "ema.safetensors"):
        fa, fb = _tensors(tmp_path / "full/checkpoints/0000006" / name), _tensors(part / "checkpoints/0000006" / name)
        assert all(torch.equal(fa[k], fb[k]) for k in fa)
    # The run folder's outputs.
    assert (part / "options-resume-0000002.json").exists()
    options = json.loads((tmp_path / "full" / "options.json").read_text())
    assert options["model"] == "GET-XXS/2" and options["bs"] == 8 and options["model_config"]["hidden_size"] == 64
    assert Image.open(tmp_path / "full" / "loss.png").format == "PNG"
    assert Image.open(tmp_path / "full" / "samples" / "0000006.png").size == (16, 16)  # 4 samples of 8x8
    assert [p.name for p in sorted((tmp_path / "full" / "checkpoints").iterdir())] == ["0000002", "0000004", "0000006"]
    assert list((tmp_path / "full" / "tb").iterdir())
    model = GET.from_pretrained(tmp_path / "full" / "checkpoints" / "0000006")  # the EMA weights
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3, 8, 8)
    # The first loss is exact: a fresh GET outputs 0, so every state's L1 is mean |image|.
    ds = train_get.PairDataset(data)
    sampler = EpochSampler(len(ds), 0, 1, seed=42)
    first = ds.get_batch(sampler.indices()[:8])["image"]
    assert full[0]["loss_state1"] == pytest.approx(first.abs().mean().item(), rel=1e-6)
    # Another model config is refused, naming the difference.
    with pytest.raises(UserError, match="hidden_size: checkpoint 64 vs now 128") as refused:
        train_get.main(train_get.parse_args(["--data", str(data), "--outdir", str(part), "--model", "GET-XS/2",
                                             "--bs", "8", "--steps", "8", "--resume"]))
    assert isinstance(refused.value.__cause__, CheckpointMismatchError)
    assert not (part / "options-resume-0000006.json").exists()  # a refused resume leaves the run folder as it was


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    good, bad = make_pairs(tmp_path / "good"), make_pairs(tmp_path / "bad", nan=True)
    out = tmp_path / "run"
    run(good, out, steps=2)
    # Every pair of `bad` gives a NaN loss: steps 3 and 4 are skipped; weights, EMA and optimiser stay as at step 2.
    stats = run(bad, out, "--resume", "--allow-data-change", "--max-nonfinite", "3", steps=4)
    assert [(r["step"], r["skipped"], "loss" in r) for r in stats[2:]] == [(3, 1, False), (4, 2, False)]
    ckpt2, ckpt4 = out / "checkpoints" / "0000002", out / "checkpoints" / "0000004"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = _tensors(ckpt2 / name), _tensors(ckpt4 / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    oa = torch.load(ckpt2 / "optimizers.pt", weights_only=True)["opt"]["state"]
    ob = torch.load(ckpt4 / "optimizers.pt", weights_only=True)["opt"]["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) and oa[i]["step"] == ob[i]["step"] for i in oa)
    # A third bad step in a row stops the run with a clear message; the last good checkpoint stays the latest.
    with pytest.raises(TrainingDivergedError, match="3 non-finite steps in a row"):
        run(bad, out, "--resume", "--allow-data-change", "--max-nonfinite", "3", steps=10)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["0000002", "0000004"]


def test_conditional_pairs_train_a_conditional_model(tmp_path):
    data = make_pairs(tmp_path / "pairs", label_dim=3)
    stats = run(data, tmp_path / "run", "--micro-bs", "4", steps=2)  # 2 micro-batches accumulate to 8
    assert len(stats) == 2 and all(r["skipped"] == 0 for r in stats)
    model = GET.from_pretrained(tmp_path / "run" / "checkpoints" / "0000002")
    assert model.num_classes == 3


def test_sample_script(tmp_path):
    data = make_pairs(tmp_path / "pairs")
    run(data, tmp_path / "run", steps=2)
    a = sample.main(sample.parse_args(["--ckpt", str(tmp_path / "run"), "--seeds", "3-7,11", "--batch", "4",
                                       "--npz", str(tmp_path / "a.npz"), "--outdir", str(tmp_path / "png")]))
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "run"), "--seeds", "3-7,11", "--batch", "2",
                                   "--npz", str(tmp_path / "b.npz")]))
    fa, fb = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert fa["seeds"].tolist() == [3, 4, 5, 6, 7, 11] and a["n"] == 6
    assert np.array_equal(fa["images"], fb["images"])  # a sample depends on its seed only, not on --batch
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / "000000" / "000011.png")), fa["images"][5])
    # The same images by hand: EMA weights, the seed's latent and its own z_0 stream.
    model = GET.from_pretrained(tmp_path / "run" / "checkpoints" / "0000002").eval()
    noise = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (3, 11)])
    with torch.no_grad():
        images = model(noise, z0=draw_inputs([3, 11], model).z0)
    expected = (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(fa["images"][[0, 5]], expected)
    # Held-out pairs: the MSE against their images and the data-mean baseline.
    out = sample.main(sample.parse_args(["--ckpt", str(tmp_path / "run"), "--pairs", str(data), "--batch", "5",
                                         "--metrics", str(tmp_path / "m.json")]))
    ds = train_get.PairDataset(data)
    pairs = ds.get_batch(list(range(len(ds))))
    with torch.no_grad():
        pred = model(pairs["noise"], z0=draw_inputs(pairs["seed"].tolist(), model).z0)
    assert out["mse"] == pytest.approx((pred - pairs["image"]).double().square().mean().item(), rel=1e-6)
    assert out["mse_data_mean"] == pytest.approx(pairs["image"].double().var(0, unbiased=False).mean().item())
    assert json.loads((tmp_path / "m.json").read_text())["n"] == len(ds)


def test_ddp_two_processes_match_one_process(tmp_path):
    """Two gloo ranks (torchrun) take one step; the result equals one process averaging both ranks' halves."""
    data = make_pairs(tmp_path / "pairs")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           "--data", str(data), "--outdir", str(out), "--model", "GET-XXS/2",
           "--bs", "8", "--steps", "1", "--log-every", "1", "--ckpt-every", "1", "--grid-seeds", "0-3",
           "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = out / "checkpoints" / "0000001"
    assert (ckpt / "rng-rank000.pt").exists() and (ckpt / "rng-rank001.pt").exists()
    # The same step by hand: each rank's half batch with its own z_0 stream, gradients averaged, one AdamW step.
    args = train_get.parse_args(["--data", str(data), "--model", "GET-XXS/2", "--bs", "8"])
    ds = train_get.PairDataset(data)
    model, _ = train_get.build_models(args, ds, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    rank_losses = []
    for rank in range(2):
        batch = ds.get_batch(EpochSampler(len(ds), rank, 2, seed=42).indices()[:4])
        gen = torch.Generator().manual_seed(rank_seed(42, rank))
        loss, _ = fp_correction(l1_loss, model.trajectory(batch["noise"], generator=gen), batch["image"])
        (loss / 2).backward()
        rank_losses.append(loss.item())
    opt.step()
    stats = read_stats(out)
    assert stats[0]["loss"] == pytest.approx(sum(rank_losses) / 2, rel=1e-6)
    saved = _tensors(ckpt / "model.safetensors")
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved[name], p.detach(), rtol=1e-5, atol=1e-7)


def test_vit_baseline_trains(tmp_path):
    # The paper's ViT baseline goes through the same loop: one state, no z_0 and no fixed-point residuals.
    stats = run(make_pairs(tmp_path / "pairs", label_dim=3), tmp_path / "run", "--model", "ViT-B/2", steps=2)
    assert [s["step"] for s in stats] == [1, 2] and "loss_state1" in stats[-1]
    assert not any(k.startswith("residual") for k in stats[-1])
    assert (tmp_path / "run" / "checkpoints" / "0000002" / "ema.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--warmup", "-5"], "--warmup must be a finite number >= 0, got -5"),
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--gamma", "nan"], "--gamma must be a finite number >= 0, got nan"),
    (["--clip-grad", "-1"], "--clip-grad must be a finite number >= 0, got -1.0"),
    (["--beta2", "1"], "--beta2 must be in [0, 1), got 1.0"),
    (["--eps", "inf"], "--eps must be a finite number > 0, got inf"),
    (["--seed", "-1"], "--seed must be a finite number >= 0, got -1"),
    (["--nproc", "0"], "--nproc must be an integer >= 1, got 0"),
    (["--grid-seeds", "9-3"], "--grid-seeds '9-3': seeds: range '9-3' is decreasing"),
    (["--grid-seeds", "x"], "--grid-seeds 'x': seeds: cannot parse item 'x'"),
])
def test_numeric_options_are_checked_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        train_get.parse_args(["--data", "d", "--outdir", "o", *argv])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].split(": error: ")[1].startswith(message)


def test_the_checkpoint_is_saved_before_the_grid(tmp_path, monkeypatch):
    """A step that is due for a checkpoint and a grid: the checkpoint is written first, so a failing grid loses
    nothing."""
    def broken_grid(*args, **kwargs):
        raise RuntimeError("grid failed")

    monkeypatch.setattr(train_get, "grid_images", broken_grid)
    data = make_pairs(tmp_path / "pairs")
    with pytest.raises(RuntimeError, match="grid failed"):
        run(data, tmp_path / "run", "--sample-every", "2", steps=2)
    assert (tmp_path / "run" / "checkpoints" / "0000002" / "checkpoint.json").is_file()


def test_resume_on_another_pair_set_is_refused_unless_asked(tmp_path):
    data, other, smaller = (make_pairs(tmp_path / "a"), make_pairs(tmp_path / "b", salt=1),
                            make_pairs(tmp_path / "c", n=16))
    out = tmp_path / "run"
    run(data, out, steps=2)
    meta = json.loads((out / "checkpoints" / "0000002" / "checkpoint.json").read_text())
    assert meta["state"]["data"] == data_identity(train_get.PairDataset(data))
    # Same shape and seeds, other pairs: refused before anything is written to the run folder.
    with pytest.raises(UserError, match=f"^--data {other}: not the pair set the checkpoint was trained on"):
        run(other, out, "--resume", steps=4)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("options")) == ["options.json"]
    # Asked for: continues, and the change is recorded with the resume's options.
    run(other, out, "--resume", "--allow-data-change", steps=4)
    resumed = json.loads((out / "options-resume-0000002.json").read_text())
    assert resumed["data_change"]["to"]["root"] == str(other) and resumed["data_change"]["from"]["root"] == str(data)
    meta = json.loads((out / "checkpoints" / "0000004" / "checkpoint.json").read_text())
    assert meta["state"]["data"]["root"] == str(other)
    # A smaller set cannot continue the data order: the error names --data.
    with pytest.raises(UserError, match=f"^--data {smaller}: 16 pairs; the checkpoint's data order was over 32"):
        run(smaller, out, "--resume", "--allow-data-change", steps=6)
    assert not (out / "options-resume-0000004.json").exists()


def test_user_errors_end_with_one_line(tmp_path):
    """Run as a script, a user error is one line on stderr naming the flag and the file, exit status 1, no
    traceback, and nothing written."""
    cmd = [sys.executable, str(SCRIPT), "--data", str(tmp_path / "missing"), "--outdir", str(tmp_path / "run"),
           "--model", "GET-XXS/2", "--device", "cpu"]
    result = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"train_get.py: error: --data: {tmp_path / 'missing' / 'manifest.json'}")
    assert not (tmp_path / "run").exists()
    # The same error raised in the workers --nproc spawns is reported once, not in the elastic launcher's dump.
    result = subprocess.run(cmd + ["--nproc", "2"], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"train_get.py: error: --data: {tmp_path / 'missing' / 'manifest.json'}")


def test_sample_refuses_non_finite_pairs_and_bad_options(tmp_path, capsys):
    run(make_pairs(tmp_path / "pairs"), tmp_path / "run", steps=2)
    bad = make_pairs(tmp_path / "bad", nan={5, 9})
    with pytest.raises(UserError, match=f"^--pairs {bad}: 2 of 32 pairs hold NaN or inf \\(seeds 5, 9\\)"):
        sample.main(sample.parse_args(["--ckpt", str(tmp_path / "run"), "--pairs", str(bad)]))
    with pytest.raises(UserError, match=f"^--ckpt {tmp_path / 'nope'}: no such checkpoint"):
        sample.main(sample.parse_args(["--ckpt", str(tmp_path / "nope"), "--grid", str(tmp_path / "g.png")]))
    for argv, message in ((["--grid-n", "0"], "--grid-n must be an integer >= 1, got 0"),
                          (["--seeds", "3-1"], "--seeds '3-1': seeds: range '3-1' is decreasing")):
        with pytest.raises(SystemExit):
            sample.parse_args(["--ckpt", "c", "--grid", "g.png", *argv])
        assert capsys.readouterr().err.splitlines()[-1].split(": error: ")[1].startswith(message)
