"""DisBack (get.distill.disback): the degradation path format, Algorithm 1's recording against the frozen initial
generator with exact resume, the backtracking schedule, and strict, resumable target switching."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from get.distill import dmd
from get.distill.disback import (
    MANIFEST,
    BacktrackingSchedule,
    BacktrackingTarget,
    DegradationSettings,
    PathError,
    PathMismatchError,
    load_node,
    load_path,
    node_file,
    read_node,
    record_degradation,
)
from get.edm.precond import EDMPrecond
from get.io import tensors_sha256
from get.mixture import MixtureTeacher
from get.models import GET_models

SETTINGS = DegradationSettings(iterations=6, interval=2, lr=1e-3, batch=3, seed=5)  # nodes at 0, 2, 4, 6


def tiny_teacher(seed: int = 0) -> EDMPrecond:
    """An 8x8 conditional DDPM++ teacher with EDM CIFAR-10's augmentation layer (which the fake-score copy drops)."""
    torch.manual_seed(seed)
    return EDMPrecond(img_resolution=8, img_channels=3, label_dim=2, model_type="SongUNet", model_channels=8,
                      channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.1,
                      augment_dim=9).eval().requires_grad_(False)


class TinyGenerator(nn.Module):
    """A GET (which draws its z_0 from the global RNG) followed by a BatchNorm in training mode: a forward in training
    mode would update the norm's running statistics, so the recording must leave the buffers alone too."""

    def __init__(self, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.get = GET_models["GET-XXS/2"](input_size=8, num_classes=2)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, latents, labels):
        return self.norm(self.get(latents, labels))


def latents(batch, device):
    return torch.randn(batch, 3, 8, 8, device=device), torch.randint(2, (batch,), device=device)


def record(folder, teacher=None, generator=None, settings=SETTINGS, sample=latents, **kwargs):
    teacher = teacher or tiny_teacher()
    return record_degradation(teacher, dmd.make_fake_score(teacher, "copy"), generator or TinyGenerator(), sample,
                              folder, settings, **kwargs)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A complete 4-node path of the tiny teacher."""
    return record(tmp_path_factory.mktemp("path") / "path")


# ----------------------------------------------------------------------------
# Settings.


def test_node_iterations_and_the_papers_setting():
    paper = DegradationSettings.paper_64x64(iterations_per_epoch=10)
    assert (paper.iterations, paper.interval, paper.lr, paper.batch) == (2000, 500, 1e-5, 32)
    assert paper.node_iterations() == [0, 500, 1000, 1500, 2000]  # 5 nodes, i = 0 ... 4, node 0 the teacher
    assert DegradationSettings(10, 4).node_iterations() == [0, 4, 8, 10]  # the final state appended
    assert DegradationSettings(4, 4).node_iterations() == [0, 4]
    assert DegradationSettings(3, 5).node_iterations() == [0, 3]
    for kwargs, field in ((dict(interval=0), "interval"), (dict(lr=-1.0), "lr"), (dict(batch=1.5), "batch"),
                          (dict(sigma_range=(0.5, 0.2)), "sigma_range"), (dict(sigma_min=90.0), "sigma_min"),
                          (dict(iterations=5000, interval=1), "nodes")):
        with pytest.raises(ValueError, match=field):
            DegradationSettings(**{"iterations": 10, "interval": 2, **kwargs})


# ----------------------------------------------------------------------------
# Recording (Algorithm 1) and the path format.


def test_record_writes_the_documented_path_and_never_moves_the_generator(tmp_path):
    teacher, generator = tiny_teacher(), TinyGenerator()
    generator.get.blocks[0].requires_grad_(False)  # a mixed pattern of flags, restored exactly afterwards
    grads = [p.requires_grad for p in generator.parameters()]
    before = snapshot(generator)
    score, messages = dmd.make_fake_score(teacher, "copy"), []
    rng = torch.get_rng_state()
    path = record_degradation(teacher, score, generator, latents, tmp_path / "path", SETTINGS, log=messages.append)

    assert_same_state(snapshot(generator), before)  # parameters and BatchNorm buffers bit-identical
    assert [p.requires_grad for p in generator.parameters()] == grads and generator.training
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    assert sorted(p.name for p in path.folder.iterdir()) == sorted([MANIFEST] + [node_file(i) for i in range(4)])
    manifest = json.loads((path.folder / MANIFEST).read_text())
    assert manifest["format"] == "get-disback-path" and manifest["version"] == 1
    assert manifest["teacher"] == {"name": teacher.name, "sha256": teacher.identity()["sha256"]}
    assert manifest["generator"] == {"sha256": tensors_sha256(before)}
    assert manifest["settings"] == SETTINGS.to_dict() and manifest["complete"] is True and manifest["resume"] is None
    assert manifest["network"]["kwargs"]["augment_dim"] == 0  # the fake-score copy's config
    assert [(n["index"], n["file"], n["iteration"]) for n in manifest["nodes"]] == [
        (i, node_file(i), it) for i, it in enumerate([0, 2, 4, 6])]
    nodes = [load_file(path.folder / node_file(i)) for i in range(4)]
    assert [tensors_sha256(t) for t in nodes] == [n["sha256"] for n in manifest["nodes"]]
    teacher_state = teacher.state_dict()
    assert all(torch.equal(v, teacher_state[k]) for k, v in nodes[0].items())  # node 0 is the teacher
    assert "model.map_augment.0.weight" not in nodes[0]  # the copy leaves the never-used layer out
    assert all(any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(nodes, nodes[1:]))  # it degrades
    assert len(messages) == 3 and "node 3 at iteration 6" in messages[-1]
    assert load_path(path.folder) == path


def test_one_iteration_is_denoising_score_matching_alone_on_the_frozen_generator(tmp_path):
    teacher, generator = tiny_teacher(), TinyGenerator()
    settings = DegradationSettings(iterations=1, interval=1, lr=1e-3, batch=3, sigma_range=(0.1, 0.9), seed=3)
    path = record(tmp_path / "path", teacher, generator, settings)

    score = dmd.make_fake_score(teacher, "copy")
    opt = torch.optim.Adam(score.parameters(), lr=1e-3)
    torch.manual_seed(3)
    z, labels = latents(3, "cpu")
    with torch.no_grad():
        x0 = generator.eval()(z, labels)  # eval: the BatchNorm's running statistics, not the batch's
    grid = dmd.karras_sigmas()
    sigma = dmd.sample_sigma(3, grid, *dmd.index_range(1000, 0.1, 0.9))
    loss = dmd.fake_score_loss(score.train(), x0, sigma, torch.randn_like(x0), dmd.one_hot(labels, 2))
    loss.backward()
    opt.step()
    assert_same_state(read_node(path, 1), score.state_dict())


def test_a_killed_recording_resumes_to_the_same_nodes(tmp_path):
    full = record(tmp_path / "full")

    class Killed(Exception):
        pass

    calls = 0

    def dies_in_the_third_interval(batch, device):
        nonlocal calls
        calls += 1
        if calls == 6:  # iteration 5: two intervals done (nodes 1 and 2), the third half-way
            raise Killed
        return latents(batch, device)

    with pytest.raises(Killed):
        record(tmp_path / "part", sample=dies_in_the_third_interval)
    part = load_path(tmp_path / "part")
    assert not part.complete and part.last == 2 and part.resume["iteration"] == 4
    assert sorted(p.name for p in part.folder.glob("resume-*.pt")) == ["resume-0000004.pt"]

    messages = []
    resumed = record(tmp_path / "part", log=messages.append)  # fresh teacher copy and generator, as a new process
    assert "resuming at iteration 4" in messages[0]
    assert resumed.complete and [n.sha256 for n in resumed.nodes] == [n.sha256 for n in full.nodes]
    for i in range(4):
        assert (full.folder / node_file(i)).read_bytes() == (resumed.folder / node_file(i)).read_bytes()
    assert not list(resumed.folder.glob("resume-*.pt"))  # the resume state goes once the path is complete

    # A run killed before its first snapshot restarts from node 0 and the seed.
    calls = 0
    with pytest.raises(Killed):
        record(tmp_path / "early", settings=DegradationSettings(6, 6, lr=1e-3, batch=3, seed=5),
               sample=dies_in_the_third_interval)
    assert load_path(tmp_path / "early").last == 0
    early = record(tmp_path / "early", settings=DegradationSettings(6, 6, lr=1e-3, batch=3, seed=5))
    assert early.nodes[-1].sha256 == full.nodes[-1].sha256  # one interval of 6 = the same 6 iterations


def test_a_path_of_another_teacher_generator_network_or_settings_is_refused(recorded, tmp_path):
    folder = recorded.folder
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert record(folder) == recorded  # complete and identical: returned as it is, nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    lr = DegradationSettings(**{**SETTINGS.to_dict(), "lr": 2e-3, "betas": (0.9, 0.999), "sigma_range": (0, 1)})
    with pytest.raises(PathMismatchError, match=r"path\.json.*settings\.lr = 0\.001, the caller has 0\.002"):
        record(folder, settings=lr)
    with pytest.raises(PathMismatchError, match=r"generator\.sha256"):
        record(folder, generator=TinyGenerator(seed=7))
    recorded.check(tiny_teacher(), TinyGenerator())  # what a trainer checks before its first generator update
    with pytest.raises(PathMismatchError, match=r"path\.json: this path was recorded with generator\.sha256"):
        recorded.check(generator=TinyGenerator(seed=7))
    with pytest.raises(PathMismatchError, match=r"teacher\.sha256"):
        record(folder, teacher=tiny_teacher(seed=3))
    teacher = tiny_teacher()
    wide = EDMPrecond(img_resolution=8, img_channels=3, label_dim=2, model_type="SongUNet", model_channels=16,
                      channel_mult=[1], num_blocks=1, attn_resolutions=[])
    with pytest.raises(ValueError, match="start as the teacher.*tensors model.map_label.weight.* not the teacher's"):
        record_degradation(teacher, wide, TinyGenerator(), latents, tmp_path / "new", SETTINGS)
    mixture = MixtureTeacher(resolution=8, channels=3, num_components=2, rank=2)
    scratch = dmd.make_fake_score(mixture, "scratch", model_channels=8, channel_mult=(1,))
    with pytest.raises(ValueError, match="must start as the teacher.*EDMPrecond.*residual"):
        record_degradation(mixture, scratch, TinyGenerator(), latents, tmp_path / "new", SETTINGS)
    assert not (tmp_path / "new").exists()


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, z, labels):
        return self.scale * z


def latents_unconditional(batch, device):
    return torch.randn(batch, 3, 8, 8, device=device), None


def test_the_analytic_teacher_records_through_the_residual_fake_score(tmp_path):
    mixture = MixtureTeacher(resolution=8, channels=3, num_components=2, rank=2)
    torch.manual_seed(0)
    score = dmd.make_fake_score(mixture, "residual", model_channels=8, channel_mult=(1,))
    start = snapshot(score)
    path = record_degradation(mixture, score, Scale(), latents_unconditional, tmp_path / "p",
                              DegradationSettings(2, 1, lr=1e-3, batch=2))
    assert path.teacher == {"name": mixture.name, "sha256": mixture.identity()["sha256"]}
    assert_same_state(read_node(path, 0), start)  # node 0: the teacher plus the correction's initial (~0) output
    assert all(k.startswith("net.") for k in read_node(path, 2))  # the teacher itself is never saved


def test_load_path_verifies_every_node_and_names_what_is_wrong(recorded, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in recorded.folder.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((folder / MANIFEST).read_text())

    def broken(edit):
        m = json.loads(json.dumps(manifest))
        edit(m)
        (folder / MANIFEST).write_text(json.dumps(m))

    for edit, match in (
            (lambda m: m.update(format="get-pairs"), "format 'get-pairs'"),
            (lambda m: m.update(extra=1), "unexpected \\['extra'\\]"),
            (lambda m: m["nodes"][1].update(file="../node-001.safetensors"), r"nodes\[1\]"),
            (lambda m: m["nodes"][2].update(iteration=3), r"nodes\[2\].*'iteration': 4"),
            (lambda m: m["nodes"][1].update(sha256="x"), r"nodes\[1\]\.sha256"),
            (lambda m: m["settings"].update(interval=0), "settings: .*interval"),
            (lambda m: m["settings"].pop("seed"), "settings must have exactly the fields"),
            (lambda m: m["settings"].update(iterations=2 ** 40, interval=1), "path nodes, more than 1000"),
            (lambda m: m.update(complete=False), "complete is False but 4 of 4"),
            (lambda m: m["teacher"].update(sha256=None), r"teacher\.sha256"),
            (lambda m: m.update(resume={"file": "resume-0000006.pt", "iteration": 6, "sha256": "0" * 64}),
             "resume must be null once complete")):
        broken(edit)
        with pytest.raises(PathError, match=match):
            load_path(folder)
    broken(lambda m: None)
    assert load_path(folder).nodes == recorded.nodes

    data = bytearray((folder / node_file(2)).read_bytes())
    data[-1] ^= 1  # one weight bit: the header still parses
    (folder / node_file(2)).write_bytes(bytes(data))
    with pytest.raises(PathError, match=r"node-002\.safetensors: the tensors' sha256 .* node 2"):
        load_path(folder)
    (folder / node_file(2)).unlink()
    with pytest.raises(FileNotFoundError, match=r"node-002\.safetensors: node 2"):
        load_path(folder)
    with pytest.raises(FileNotFoundError, match="folder not found"):
        load_path(tmp_path / "absent")


def test_load_node_is_strict_and_names_the_file_and_keys(recorded):
    teacher = tiny_teacher()
    network = dmd.make_fake_score(teacher, "copy")
    assert load_node(recorded, 3, network).iteration == 6
    assert_same_state(network.state_dict(), read_node(recorded, 3))

    def refused(net, match):
        before = snapshot(net)
        with pytest.raises(PathError, match=match):
            load_node(recorded, 3, net)
        assert_same_state(snapshot(net), before)  # nothing loaded

    refused(tiny_teacher(), r"node-003\.safetensors: node 3 .*missing keys model\.map_augment")  # the teacher's extra
    unconditional = EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=8,
                               channel_mult=[1], num_blocks=1, attn_resolutions=[])
    refused(unconditional, r"node-003\.safetensors.*unexpected keys model\.map_label\.bias, model\.map_label\.weight$")
    wide = EDMPrecond(img_resolution=8, img_channels=3, label_dim=2, model_type="SongUNet", model_channels=16,
                      channel_mult=[1], num_blocks=1, attn_resolutions=[])
    refused(wide, r"other shapes or dtypes model\.dec\.8x8_aux_conv\.weight \(file \(3, 8, 3, 3\) torch\.float32, "
                 r"network \(3, 16, 3, 3\)")
    refused(dmd.make_fake_score(teacher, "copy").double(), r"torch\.float32, network .* torch\.float64")
    with pytest.raises(PathError, match="no node 4; the path has nodes 0 ... 3"):
        load_node(recorded, 4, network)


# ----------------------------------------------------------------------------
# The backtracking schedule (Algorithm 2).


def test_the_papers_schedule():
    schedule = BacktrackingSchedule.paper_64x64()
    assert schedule.num_nodes == 5 and schedule.steps == {4: 1000, 3: 1000, 2: 10000, 1: 10000}
    for step, node in ((0, 4), (999, 4), (1000, 3), (1999, 3), (2000, 2), (11999, 2), (12000, 1), (21999, 1),
                       (22000, 0), (22001, 0), (50000, 0), (10 ** 12, 0)):
        assert schedule.target(step) == node, step
    assert schedule.teacher_step == 22000  # the last switch: to the teacher for the rest of the 50k steps
    assert schedule.switches() == [(1000, 4, 3), (2000, 3, 2), (12000, 2, 1), (22000, 1, 0)]
    assert schedule.to_dict() == {"steps": {"4": 1000, "3": 1000, "2": 10000, "1": 10000}}
    assert BacktrackingSchedule.parse("paper", 5).steps == schedule.steps
    assert BacktrackingSchedule.parse("1000,1000,10000,10000", 5).steps == schedule.steps
    assert BacktrackingSchedule.from_rule(5, lambda i: 1000 if i >= 3 else 10000).steps == schedule.steps


def test_uniform_and_custom_schedules():
    uniform = BacktrackingSchedule.parse("uniform:100", 5)  # the README: start at node N - 1, move every 100 steps
    assert [uniform.target(s) for s in (0, 99, 100, 199, 200, 299, 300, 10 ** 6)] == [3, 3, 2, 2, 1, 1, 0, 0]
    assert uniform.switches() == [(100, 3, 2), (200, 2, 1), (300, 1, 0)]
    skips = BacktrackingSchedule({1: 5, 2: 0, 3: 2})  # a node with 0 steps is never the target
    assert [skips.target(s) for s in range(9)] == [3, 3, 1, 1, 1, 1, 1, 0, 0]
    assert skips.switches() == [(2, 3, 1), (7, 1, 0)] and skips.teacher_step == 7
    teacher_only = BacktrackingSchedule({1: 0, 2: 0})
    assert teacher_only.target(0) == 0 and teacher_only.switches() == [] and teacher_only.teacher_step == 0
    rng = random.Random(0)
    for _ in range(50):  # against the schedule written out step by step
        counts = {i: rng.randrange(4) for i in range(1, rng.randrange(2, 6))}
        expanded = [i for i in sorted(counts, reverse=True) for _ in range(counts[i])]
        schedule = BacktrackingSchedule(counts)
        assert [schedule.target(s) for s in range(len(expanded) + 3)] == expanded + [0, 0, 0]
    for bad, match in (({1: 3, 3: 2}, "exactly the nodes 1 ... N"), ({}, "exactly"), ([3, 2], "exactly"),
                       ({1: -1}, r"steps\[1\]"), ({1: 2.5}, r"steps\[1\]")):
        with pytest.raises(ValueError, match=match):
            BacktrackingSchedule(bad)
    for spec, match in (("1,2", "2 step counts for a path of 5 nodes"), ("1,x,2,3", "expected 'paper'"),
                        ("uniform:-1", r"steps\[1\]")):
        with pytest.raises(ValueError, match=match):
            BacktrackingSchedule.parse(spec, 5)
    with pytest.raises(ValueError, match="step"):
        uniform.target(-1)


# ----------------------------------------------------------------------------
# Strict switching and exact resume.


SCHEDULE = {3: 2, 2: 3, 1: 2}  # node 3 at steps 0-1, node 2 at 2-4, node 1 at 5-6, the teacher from step 7


def run_target(target: BacktrackingTarget, steps: range, x) -> tuple[list, list]:
    """Per step: the switch returned (or None) and the target's denoised output on fixed inputs."""
    switches, outputs = [], []
    for step in steps:
        switches.append(target.update(step))
        outputs.append(target(*x).detach())
    return switches, outputs


def test_the_target_switches_as_scheduled_and_resumes_exactly(recorded):
    teacher = tiny_teacher()
    x = (torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), dmd.one_hot(torch.tensor([0, 1]), 2))
    messages = []
    full = BacktrackingTarget(recorded, dmd.make_fake_score(teacher, "copy"), BacktrackingSchedule(SCHEDULE),
                              log=messages.append)
    with pytest.raises(RuntimeError, match="call update"):
        full(*x)
    switches, outputs = run_target(full, range(10), x)
    files = [node_file(i) for i in range(4)]
    assert [s for s in switches if s] == [{"step": 0, "from": None, "to": 3, "file": files[3]},
                                          {"step": 2, "from": 3, "to": 2, "file": files[2]},
                                          {"step": 5, "from": 2, "to": 1, "file": files[1]},
                                          {"step": 7, "from": 1, "to": 0, "file": files[0]}]
    assert "step 7: node 1 -> node 0" in messages[-1] and files[0] in messages[-1]
    torch.testing.assert_close(outputs[-1], teacher(*x), rtol=0, atol=0)  # node 0 is the teacher
    assert not any(p.requires_grad for p in full.network.parameters())

    # Saved after step `last` (the next update is at last + 1: before the switch at 5, exactly at it, and after it).
    for last in (3, 4, 5):
        part = BacktrackingTarget(recorded, dmd.make_fake_score(teacher, "copy"), BacktrackingSchedule(SCHEDULE))
        run_target(part, range(last + 1), x)
        state = json.loads(json.dumps(part.state_dict()))  # JSON-able, as a trainer's checkpoint.json keeps it
        fresh = BacktrackingTarget(recorded, dmd.make_fake_score(teacher, "copy"), BacktrackingSchedule(SCHEDULE))
        fresh.load_state_dict(state)
        assert fresh.index == part.index
        rest_switches, rest_outputs = run_target(fresh, range(last + 1, 10), x)
        assert rest_switches == switches[last + 1:], last
        for a, b in zip(rest_outputs, outputs[last + 1:]):
            assert torch.equal(a, b), last


def test_the_target_refuses_what_does_not_fit(recorded, tmp_path):
    network = dmd.make_fake_score(tiny_teacher(), "copy")
    with pytest.raises(ValueError, match="schedule is for 5 nodes, the path .* has 4"):
        BacktrackingTarget(recorded, network, BacktrackingSchedule.paper_64x64())
    target = BacktrackingTarget(recorded, network, BacktrackingSchedule(SCHEDULE))
    with pytest.raises(PathMismatchError, match="another degradation path"):
        target.load_state_dict({"index": 2, "path_sha256": "0" * 64})
    with pytest.raises(ValueError, match="index must be an integer in \\[0, 3\\]"):
        target.load_state_dict({"index": 9, "path_sha256": recorded.sha256})
    with pytest.raises(ValueError, match="expected keys"):
        target.load_state_dict({"index": 2})

    class Stop(Exception):
        pass

    def stop_after_first_node(batch, device):
        raise Stop

    with pytest.raises(Stop):
        record(tmp_path / "partial", sample=stop_after_first_node)
    with pytest.raises(PathError, match="incomplete \\(1 of 4 nodes\\)"):
        BacktrackingTarget(load_path(tmp_path / "partial"), network, BacktrackingSchedule(SCHEDULE))
