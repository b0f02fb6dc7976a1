import argparse
import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from pair_sets import make_pairs
from PIL import Image

from get.data import EpochSampler, PairDataset
from get.models import GET, GET_models
from get.seeds import rank_seed
from get.training.checkpoints import (
    CheckpointMismatchError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prepare_run_dir,
    record_options,
    save_checkpoint,
)
from get.training.cli import NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT, UserError, blame, check_ranges
from get.training.guards import NonFiniteGuard, TrainingDivergedError
from get.training.logs import StatsLogger, Throughput, plot_loss_curve, read_stats
from get.training.modules import update_ema
from get.training.pairs import data_identity, nonfinite_seeds, resume_data


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.zeros(2, dtype=torch.float64), requires_grad=False)
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64))


def test_update_ema_math():
    model, ema = Tiny(), Tiny()
    e0 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    ema.w.data.copy_(e0)
    p1, p2 = torch.tensor([0.5, -1.0, 4.0], dtype=torch.float64), torch.tensor([2.0, 0.0, -3.0], dtype=torch.float64)
    model.frozen.data.fill_(7.0)  # a frozen parameter is skipped: the EMA copy keeps its own value
    model.count.fill_(5.0)  # buffers are copied
    model.w.data.copy_(p1)
    update_ema(ema, model, 0.9)
    model.w.data.copy_(p2)
    update_ema(ema, model, 0.9)
    expected = 0.9 * (0.9 * e0 + 0.1 * p1) + 0.1 * p2
    torch.testing.assert_close(ema.w.data, expected, rtol=1e-15, atol=1e-15)
    assert ema.frozen.data.tolist() == [0.0, 0.0]
    assert ema.count.item() == 5.0


def test_update_ema_skips_gets_pos_embed_and_matches_closed_form():
    model = GET_models["GET-XXS/2"](input_size=8)
    ema = GET(**model.config)
    ema.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    update_ema(ema, model, 0.75)
    for name, p in ema.named_parameters():
        if name == "pos_embed":
            assert torch.equal(p, before[name])
        else:
            torch.testing.assert_close(p, before[name] + 0.25)


def test_rank_seed_distinct():
    seeds = {rank_seed(42, r) for r in range(8)}
    assert len(seeds) == 8 and rank_seed(42, 0) == rank_seed(42, 0) and rank_seed(43, 0) != rank_seed(42, 0)


def _tiny_run(tmp_path):
    torch.manual_seed(0)
    model = GET_models["GET-XXS/2"](input_size=8)
    ema = GET(**model.config)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    noise = torch.randn(2, 3, 8, 8)
    loss = sum(x.abs().mean() for x in model.trajectory(noise))
    loss.backward()
    opt.step()
    update_ema(ema, model, 0.5)
    return model, ema, opt


def test_checkpoint_roundtrip_rng_and_keep(tmp_path):
    model, ema, opt = _tiny_run(tmp_path)
    gen = torch.Generator().manual_seed(123)
    gen.manual_seed(5)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = {"sampler": {"epoch": 2, "position": 17}}
    for step in (10, 20, 30):
        path = save_checkpoint(tmp_path, step, {"model": model, "ema": ema}, {"opt": opt}, state,
                               generators={"z0": gen}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["0000020", "0000030"]
    assert latest_checkpoint(tmp_path) == path
    # Random draws right after the save ...
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    # ... are drawn again after loading into fresh objects.
    model2 = GET(**model.config)
    ema2 = GET(**model.config)
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-3)
    gen2 = torch.Generator()
    meta = load_checkpoint(path, {"model": model2, "ema": ema2}, {"opt": opt2}, generators={"z0": gen2})
    assert meta["step"] == 30 and meta["state"] == state and meta["rng_restored"]
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen2).item()) == expected
    for a, b in ((model, model2), (ema, ema2)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    sa, sb = opt.state_dict(), opt2.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for key in sa["state"][i]:
            assert torch.equal(sa["state"][i][key], sb["state"][i][key])
    # The folder loads as a model; the EMA weights are the default.
    loaded = GET.from_pretrained(path)
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in loaded.state_dict().items())
    # The optimiser file is plain data.
    torch.load(path / "optimizers.pt", weights_only=True)


def test_interrupted_save_is_ignored_and_overwritten(tmp_path):
    model, ema, opt = _tiny_run(tmp_path)
    save_checkpoint(tmp_path, 1, {"model": model}, {"opt": opt})
    # A save killed half-way leaves a temporary folder that is never taken for a checkpoint.
    (tmp_path / "checkpoints" / ".tmp-0000002").mkdir()
    (tmp_path / "checkpoints" / ".tmp-0000002" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "0000001"
    save_checkpoint(tmp_path, 2, {"model": model}, {"opt": opt})
    save_checkpoint(tmp_path, 2, {"model": model}, {"opt": opt})  # saving a step twice replaces it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["0000001", "0000002"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())


def test_config_mismatch_is_refused(tmp_path):
    model, ema, opt = _tiny_run(tmp_path)
    path = save_checkpoint(tmp_path, 1, {"model": model, "ema": ema}, {"opt": opt})
    other = GET_models["GET-XXS/2"](input_size=8, num_classes=10)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"num_classes: checkpoint 0 vs now 10"):
        load_checkpoint(path, {"model": other})
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing was loaded
    with pytest.raises(CheckpointMismatchError, match=r"hidden_size: checkpoint 64 vs now 128"):
        load_checkpoint(path, {"model": GET_models["GET-XS/2"](input_size=8)})
    with pytest.raises(KeyError, match="no module"):
        load_checkpoint(path, {"fake_score": model})


def test_legacy_format_optimizer_and_rng_files_are_refused(tmp_path):
    """torch.load's legacy-format reader allocates the storage sizes a file claims before checking them."""
    model, ema, opt = _tiny_run(tmp_path)
    path = save_checkpoint(tmp_path, 1, {"model": model}, {"opt": opt})
    for name in ("optimizers.pt", "rng-rank000.pt"):
        original = (path / name).read_bytes()
        torch.save(torch.load(path / name, weights_only=True), path / name, _use_new_zipfile_serialization=False)
        with pytest.raises(ValueError, match=f"{name}: not a zip-format torch.save file"):
            load_checkpoint(path, {"model": model}, {"opt": opt})
        (path / name).write_bytes(original)
    load_checkpoint(path, {"model": model}, {"opt": opt})


def test_prepare_run_dir_refuses_to_overwrite(tmp_path):
    run_dir, ckpt = prepare_run_dir(tmp_path / "run", resume=False)
    assert ckpt is None and not run_dir.exists()  # the checks write nothing
    record_options(run_dir, {"lr": 1e-4}, ckpt)
    assert json.loads((run_dir / "options.json").read_text()) == {"lr": 1e-4}
    with pytest.raises(FileExistsError, match="pass --resume"):
        prepare_run_dir(tmp_path / "run", resume=False)
    model, _, opt = _tiny_run(tmp_path)
    save_checkpoint(run_dir, 5, {"model": model}, {"opt": opt})
    with pytest.raises(FileExistsError, match="latest checkpoint 0000005"):
        prepare_run_dir(run_dir, resume=False)
    _, ckpt = prepare_run_dir(run_dir, resume=True)
    assert ckpt.name == "0000005" and not (run_dir / "options-resume-0000005.json").exists()
    record_options(run_dir, {"lr": 2e-4}, ckpt)
    assert json.loads((run_dir / "options-resume-0000005.json").read_text()) == {"lr": 2e-4}


def test_stats_logger_truncates_on_resume_and_plots(tmp_path):
    logger = StatsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"loss": 1.0 / step, "loss_last": 0.5 / step})
    with open(tmp_path / "stats.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # a line cut by a crash
    StatsLogger(tmp_path, start_step=3, tensorboard=False).log(4, {"loss": 0.2})
    assert [(r["step"], r["loss"]) for r in read_stats(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.2)]
    png = plot_loss_curve(tmp_path)
    assert Image.open(png).size == (600, 400)


def test_tensorboard_events_written(tmp_path):
    logger = StatsLogger(tmp_path)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_non_finite_guard():
    guard = NonFiniteGuard(max_in_row=3)
    assert guard.check(True, 1)
    assert not guard.check(False, 2) and not guard.check(False, 3)
    assert guard.check(True, 4)  # a good step resets the run of bad ones
    assert not guard.check(False, 5) and not guard.check(False, 6)
    with pytest.raises(TrainingDivergedError, match="3 non-finite steps in a row.*step 7.*5 in all"):
        guard.check(False, 7)


def test_throughput():
    meter = Throughput()
    meter.update(10)
    meter.update(6)
    assert meter.count == 16 and meter.rate() > 0 and meter.count == 0


def test_range_checks_name_the_flag(capsys):
    p = argparse.ArgumentParser(prog="x")
    ranges = {"lr": NON_NEGATIVE, "ema": UNIT, "eps": POSITIVE, "bs": POSITIVE_INT}
    good = argparse.Namespace(lr=0.0, ema=0.0, eps=1e-8, bs=1)
    check_ranges(p, good, ranges)
    bad = [("lr", float("nan"), "--lr must be a finite number >= 0, got nan"),
           ("lr", -1e-4, "--lr must be a finite number >= 0, got -0.0001"),
           ("ema", 1.0, "--ema must be in [0, 1), got 1.0"), ("eps", 0.0, "--eps must be a finite number > 0, got 0.0"),
           ("eps", float("inf"), "--eps must be a finite number > 0, got inf"),
           ("bs", 0, "--bs must be an integer >= 1, got 0")]
    for name, value, message in bad:
        with pytest.raises(SystemExit):
            check_ranges(p, argparse.Namespace(**{**vars(good), name: value}), ranges)
        assert capsys.readouterr().err.splitlines()[-1] == f"x: error: {message}"

def test_guards_count_per_update_and_name_it():
    guard = NonFiniteGuard(2, "critic updates")
    assert guard.check(False, 1) is False and guard.check(True, 2) and guard.in_row == 0 and guard.total == 1
    guard.check(False, 3)
    with pytest.raises(TrainingDivergedError, match=r"2 non-finite critic updates in a row .*--max-nonfinite 2"):
        guard.check(False, 4)
    assert issubclass(TrainingDivergedError, UserError)  # the scripts end it with one line


def test_resume_data_refuses_another_pair_set_unless_asked(tmp_path):
    ds = PairDataset(make_pairs(tmp_path / "a"))
    same_shape = PairDataset(make_pairs(tmp_path / "b", salt=1))
    smaller = PairDataset(make_pairs(tmp_path / "c", n=16))
    assert data_identity(ds)["manifest_sha256"] != data_identity(same_shape)["manifest_sha256"]
    sampler = EpochSampler(len(ds), seed=1)
    sampler.advance(8)
    state = {"sampler": sampler.state_dict(), "data": data_identity(ds)}
    fresh = EpochSampler(32, seed=1)
    assert resume_data(state, ds, fresh, allow_change=False) is None and fresh.position == 8
    with pytest.raises(UserError, match=f"--data {tmp_path / 'b'}: not the pair set the checkpoint was trained on "
                                        f"\\({tmp_path / 'a'}, 32 pairs.*--allow-data-change"):
        resume_data(state, same_shape, EpochSampler(32, seed=1), allow_change=False)
    change = resume_data(state, same_shape, EpochSampler(32, seed=1), allow_change=True)
    assert change == {"from": data_identity(ds), "to": data_identity(same_shape)}
    # Another size: the data order cannot continue; the error names --data, not EpochSampler.
    with pytest.raises(UserError, match=f"^--data {tmp_path / 'c'}: 16 pairs; the checkpoint's data order was over "
                                        f"32 pairs"):
        resume_data(state, smaller, EpochSampler(16, seed=1), allow_change=True)


def test_nonfinite_seeds_and_blame(tmp_path):
    ds = PairDataset(make_pairs(tmp_path / "p", nan={3, 17, 30}))
    assert nonfinite_seeds(ds, batch=5) == ([3, 17, 30], 3)
    assert nonfinite_seeds(ds, limit=2) == ([3, 17], 3)
    with pytest.raises(UserError, match="^--data: missing key$") as info:
        with blame("--data"):
            raise KeyError("missing key")
    assert isinstance(info.value.__cause__, KeyError)
