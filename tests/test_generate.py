"""data_gen/generate.py: pairs equal EDM's sampler per seed, the same data set for any --nproc and for two torchrun
nodes at equal --batch and threads per process (the bits depend on both: README, "What is bit-identical"), resume after
a killed rank, refusal of other settings, --verify naming bad shards, bad input named in one line, no non-finite
shard, no rewrite of a complete data set, and workers that end with a killed launcher.

Runs compared bit for bit use equal --batch and one thread per process (tests/conftest.py sets OMP_NUM_THREADS=1).

Process launches are the cost here (a few seconds each on 2 cores): one in-process reference data set is shared, and
each multi-process check is one launch.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from get import data
from get.edm.precond import VPPrecond
from get.edm.sampler import edm_sampler, sampler_sigma_range
from get.mixture import MixtureTeacher
from get.seeds import StackedRandomGenerator, draw_inputs, parse_seeds
from get.teachers import load_teacher, save_teacher

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "data_gen" / "generate.py"
SEEDS = "0-199,1000-1039"
COMMON = ["--teacher", "mixture-demo", "--seeds", SEEDS, "--shard-size", "8", "--steps", "3"]

_spec = importlib.util.spec_from_file_location("generate", GEN)
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def run_here(outdir, *extra) -> int:
    """generate.py's main in this process (a single process: no process group)."""
    return generate.main(generate.parse_args(["--outdir", str(outdir), *extra]))


def assert_same_dataset(a: Path, b: Path, grid: bool = True) -> None:
    ma, mb = json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text())
    assert ma == mb and ma["complete"]
    for shard in ma["shards"]:
        assert (a / shard["file"]).read_bytes() == (b / shard["file"]).read_bytes(), shard["file"]
    if grid:
        assert (a / "pairs.png").read_bytes() == (b / "pairs.png").read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("ref")
    assert run_here(outdir, *COMMON, "--batch", "16") == 0
    return outdir


def test_pairs_are_the_sampler_output_of_their_seed(ref, tmp_path):
    seeds = parse_seeds(SEEDS)
    ds = data.PairDataset(ref, verify=True)
    assert len(ds) == len(seeds) == 240 and len(ds.manifest["shards"]) == 30 and not ds.conditional
    assert ds.manifest["settings"]["teacher"]["name"] == "mixture-demo"
    teacher = load_teacher("mixture-demo")
    pick = list(range(196, 212))  # crosses the jump 199 -> 1000 and shard boundaries
    latents = draw_inputs([seeds[i] for i in pick], teacher).latents
    images = edm_sampler(teacher, latents, num_steps=3)  # (16, C, R, R) float64
    got = ds.get_batch(pick)
    assert got["seed"].tolist() == [seeds[i] for i in pick]
    assert torch.equal(got["noise"], latents) and torch.equal(got["image"], images.float())

    # Stochastic sampling continues each seed's generator after its latent, as EDM's generate.py does.
    assert run_here(tmp_path / "churn", "--teacher", "mixture-demo", "--seeds", "5-12", "--steps", "3",
                    "--S-churn", "2", "--S-max", "50") == 0
    rnd = StackedRandomGenerator("cpu", range(5, 13))
    latents = rnd.randn([8, 3, 16, 16])
    images = edm_sampler(teacher, latents, randn_like=rnd.randn_like, num_steps=3, S_churn=2, S_max=50)
    churn = data.PairDataset(tmp_path / "churn").get_batch(range(8))
    assert torch.equal(churn["image"], images.float()) and not torch.equal(churn["image"], got["image"][:8])

    # Conditional teachers: integer labels per seed (random as EDM, or balanced), fp16 image storage.
    cond = load_teacher("mixture-demo-cond")
    for policy in ("random", "balanced"):
        out = tmp_path / policy
        assert run_here(out, "--teacher", "mixture-demo-cond", "--seeds", "0-15", "--steps", "3", "--labels", policy,
                        "--image-dtype", "fp16", "--grid", "0") == 0
        pairs = data.PairDataset(out).get_batch(range(16))
        inputs = draw_inputs(range(16), cond, label_policy=policy)
        latents, labels = inputs.latents, inputs.labels
        assert torch.equal(pairs["label"], labels) and torch.equal(pairs["noise"], latents)
        assert torch.equal(pairs["image"], edm_sampler(cond, latents, labels, num_steps=3).half().float())
    assert pairs["label"].tolist() == [s % 4 for s in range(16)]


def test_same_data_set_for_any_nproc(ref, tmp_path):
    out = tmp_path / "two"
    proc = subprocess.run([sys.executable, str(GEN), *COMMON, "--outdir", str(out), "--nproc", "2", "--batch", "16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    assert_same_dataset(ref, out)


def test_same_data_set_for_any_nproc_with_a_convolutional_teacher(tmp_path):
    """A U-Net teacher whose CPU kernels round differently by batch size (measured here: --batch 16 instead of 8
    moves every image by up to 3e-5; the mixture teachers did not move): at equal --batch and threads, 2 processes give
    the bits of 1. Shards of 12 seeds in batches of 8 rows, the second padded."""
    torch.manual_seed(0)
    net = VPPrecond(img_resolution=16, img_channels=3, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                    attn_resolutions=[8]).eval()
    with torch.no_grad():  # the init zeroes some output layers: make the output depend on every weight
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_teacher(net, tmp_path / "unet")
    common = ["--teacher", str(tmp_path / "unet"), "--seeds", "0-23", "--shard-size", "12", "--steps", "2",
              "--batch", "8", "--grid", "0"]
    assert run_here(tmp_path / "one", *common) == 0
    proc = subprocess.run([sys.executable, str(GEN), *common, "--outdir", str(tmp_path / "two"), "--nproc", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_dataset(tmp_path / "one", tmp_path / "two", grid=False)


def test_two_torchrun_nodes_equal_one_process(ref, tmp_path):
    """Two torchrun "nodes" on this machine (c10d rendezvous on loopback), each starting 2 workers with --nproc 2."""
    out, port = tmp_path / "nodes", free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"get-test-{port}",
           str(GEN), *COMMON, "--outdir", str(out), "--batch", "16", "--", "--nproc", "2"]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(err[-3000:] for _, err in logs)
    assert sum("on 4 process(es)" in o for o, _ in logs) == 1  # one rank 0 in a world of 2 nodes x 2 workers
    assert_same_dataset(ref, out)


def _workers(pid: int) -> list[int]:
    """Pids of the worker processes the launcher `pid` spawned."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return sorted(found)


def test_resume_after_a_killed_rank(ref, tmp_path, capsys):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(GEN), *COMMON, "--outdir", str(out), "--nproc", "2", "--batch", "16"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest_path, deadline, killed = out / "manifest.json", time.time() + 240, None
    try:
        while time.time() < deadline and proc.poll() is None and killed is None:
            try:
                recorded = sum(s["sha256"] is not None for s in json.loads(manifest_path.read_text())["shards"])
            except (OSError, ValueError):
                recorded = 0
            workers = _workers(proc.pid)
            if recorded >= 1 and len(workers) == 2:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.01)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the run ended before a rank could be killed"
    partial = data.read_manifest(out)
    kept = sum(s["sha256"] is not None for s in partial["shards"])
    assert not partial["complete"] and 1 <= kept < 30

    capsys.readouterr()
    assert run_here(out, *COMMON, "--batch", "16") == 0
    assert f"{kept} done and verified" in capsys.readouterr().out
    assert_same_dataset(ref, out)
    assert not list(out.glob(".*.tmp"))  # the killed rank's unfinished shard file was cleaned up


def test_verify_names_bad_shards_and_the_next_run_regenerates_them(ref, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    corrupt, missing = out / "shard-00004.safetensors", out / "shard-00017.safetensors"
    raw = bytearray(corrupt.read_bytes())
    raw[len(raw) // 2] ^= 1
    corrupt.write_bytes(bytes(raw))
    missing.unlink()

    capsys.readouterr()
    assert run_here(out, "--teacher", "mixture-demo", "--verify") == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD")]
    assert len(lines) == 2 and str(corrupt) in lines[0] and "sha256" in lines[0]
    assert str(missing) in lines[1] and "missing" in lines[1]
    with pytest.raises(data.PairDataError, match="shard-00017.safetensors: missing"):
        data.PairDataset(out)
    with pytest.raises(data.PairDataError, match="shard-00004.safetensors: sha256"):
        data.PairDataset(out, verify=True)

    assert run_here(out, *COMMON, "--batch", "16") == 0
    assert "28 done and verified, 2 to generate" in capsys.readouterr().out
    assert_same_dataset(ref, out)
    assert run_here(out, "--teacher", "mixture-demo", "--verify") == 0


def test_other_settings_are_refused(ref, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(data.SettingsMismatchError, match=r"sampler.num_steps: 3 -> 4"):
        run_here(out, *COMMON[:-1], "4")
    with pytest.raises(data.SettingsMismatchError, match=r"image.dtype: 'float32' -> 'float16'"):
        run_here(out, *COMMON, "--image-dtype", "fp16")
    with pytest.raises(data.SettingsMismatchError, match=r"teacher\.config"):
        run_here(out, *COMMON[2:], "--teacher", "mixture")
    assert (out / "manifest.json").read_bytes() == before


def test_bad_flags_are_named_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "never"
    for flags, message in [(["--S-churn", "-1"], "--S-churn must be >= 0, got -1.0"),
                           (["--rho", "0"], "--rho must be > 0, got 0.0"),
                           (["--rho", "-7"], "--rho must be > 0, got -7.0"),
                           (["--sigma-min", "-1"], "--sigma-min must be > 0, got -1.0"),
                           (["--S-noise", "-1"], "--S-noise must be >= 0"),
                           (["--S-min", "2", "--S-max", "1"], "--S-min must be <= --S-max, got 2.0 > 1.0"),
                           (["--sigma-max", "inf"], "--sigma-max must be finite"),
                           (["--S-churn", "nan"], "--S-churn must be a number, got nan"),
                           (["--steps", "1"], "--steps must be an integer >= 2, got 1"),
                           (["--batch", "0"], "--batch must be >= 1, got 0"),
                           (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
                           (["--nproc", "0"], "--nproc must be >= 1, got 0"),
                           (["--seeds", str(2**64)], f"--seeds: {2**64} in '{2**64}' exceeds the largest seed"),
                           (["--seeds", "-1"], "--seeds: cannot parse item '-1' in '-1' \\(seeds must be >= 0\\)"),
                           (["--seeds", "0-3,2"], "--seeds: the seed list has duplicates \\(seed 2\\)")]:
        with pytest.raises(SystemExit) as exit_info:
            generate.parse_args(["--teacher", "mixture-demo", "--outdir", str(out), *flags])
        assert exit_info.value.code == 2
        assert re.search(f": error: {message}", capsys.readouterr().err.splitlines()[-1]), flags
    assert not out.exists()
    # The teacher's noise range is known once it is loaded: checked before the folder is made.
    teacher = SimpleNamespace(sigma_min=0.002, sigma_max=80.0)
    args = generate.parse_args(["--sigma-min", "100", "--sigma-max", "200"])
    with pytest.raises(ValueError, match=r"--sigma-min 100.0 and --sigma-max 200.0 leave no interval inside the "
                                         r"teacher's noise range \[0.002, 80.0\]"):
        sampler_sigma_range(teacher, args.sigma_min, args.sigma_max, names=generate.SAMPLER_FLAGS)


def _error_lines(stderr: str) -> list[str]:
    """stderr without tqdm's progress lines."""
    return [line for line in stderr.splitlines() if line.strip() and "%|" not in line]


def test_user_errors_are_one_line_also_from_workers(tmp_path):
    """A bad flag, and a data set that would hold non-finite values (float16 overflow of a crafted teacher) detected in
    one process or in a worker of --nproc 2: one line naming the problem on stderr, exit status != 0, no traceback, no
    shard written."""
    proc = subprocess.run([sys.executable, str(GEN), "--teacher", "mixture-demo", "--S-churn", "-1", "--outdir",
                           str(tmp_path / "a")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == "generate.py: error: --S-churn must be >= 0, got -1.0"
    assert not (tmp_path / "a").exists()

    save_teacher(MixtureTeacher(resolution=4, channels=1, num_components=2, rank=1, mean_scale=1e6, name="huge"),
                 tmp_path / "huge")
    for nproc in ([], ["--nproc", "2"]):
        out = tmp_path / f"b{len(nproc)}"
        proc = subprocess.run([sys.executable, str(GEN), "--teacher", str(tmp_path / "huge"), "--seeds", "0-7",
                               "--steps", "2", "--shard-size", "4", "--image-dtype", "fp16", "--outdir", str(out),
                               *nproc], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        lines = _error_lines(proc.stderr)
        assert len(lines) == 1 and proc.stderr.splitlines()[-1] == lines[0], proc.stderr[-3000:]
        assert re.fullmatch(r"generate.py: error: .*/b\d/shard-0000[01].safetensors: tensor 'image' is not finite "
                            r"\(NaN or inf or beyond float16's range\) for 4 of 4 seeds: (0-3|4-7); nothing written",
                            lines[0])
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


def test_a_complete_data_set_is_not_rewritten(ref, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    (out / "pairs.png").unlink()
    stale = [".manifest.json.x1y2z3_a.tmp", ".pairs.png.abcdefgh.tmp", ".shard-00003.safetensors.0a1b2c3d.tmp"]
    for name in stale + ["notes.tmp"]:
        (out / name).write_bytes(b"left by a killed run")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir() if p.name not in stale}

    capsys.readouterr()
    assert run_here(out, *COMMON) == 0
    assert "complete, all 30 shards verified; nothing to do" in capsys.readouterr().out
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    assert set(after) == set(before) | {"pairs.png"}  # the stale temporaries are gone, the missing grid is back
    assert all(after[name] == before[name] for name in before)  # nothing else was rewritten
    assert (out / "pairs.png").read_bytes() == (ref / "pairs.png").read_bytes()
    assert run_here(out, *COMMON) == 0 and after == {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
                                                     for p in out.iterdir()}
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        for p in [out, *out.iterdir()]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            assert run_here(out, *COMMON) == 0
        finally:
            out.chmod(0o755)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_workers_end_when_the_launcher_is_killed(tmp_path):
    proc = subprocess.Popen([sys.executable, str(GEN), *COMMON, "--outdir", str(tmp_path / "out"), "--nproc", "2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 120, []
    try:
        while time.time() < deadline and proc.poll() is None and len(workers) < 2:
            workers = _workers(proc.pid)
            time.sleep(0.01)
        assert len(workers) == 2, "the workers did not start"
        time.sleep(0.5)  # their start data is in the pipe: killed later, they would import and go on
        proc.kill()  # SIGKILL: the launcher cannot stop its workers
        proc.wait()
        deadline = time.time() + 30  # measured: 4 s (the workers were still importing), 1 s once running
        while time.time() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.1)
        left = [pid for pid in workers if _alive(pid)]
        assert not left, f"workers {left} outlived their launcher"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
