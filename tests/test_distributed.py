"""Distributed training on the CPU: 2 processes over gloo, launched by torchrun or DeepSpeed.

Every strategy must train exactly like one process with the same global batch; checkpoints
move between world sizes and strategies; a killed rank restarts and resumes.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ember.config import config_from_dict
from ember.distributed import get_fsdp_config, make_strategy

pytestmark = pytest.mark.slow

STEPS = 6
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def write_config(tmp_path: Path, corpus: Path, **overrides) -> Path:
    raw = {
        "model": {"preset": "tiny", "vocab_size": 259, "tie_word_embeddings": False},
        "training": {"batch_size": 8, "max_steps": STEPS, "warmup_steps": 1, "learning_rate": 3e-3, "seed": 3, "eval_batches": 2},
        "data": {"train": "builtin:stdlib", "seq_len": 32, "cache_dir": str(corpus)},
        "checkpoint": {"every_n_steps": 3, "keep_last": 4},
        "logging": {"run_dir": str(tmp_path / "runs"), "log_every": 1, "progress_bar": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]  # a resumed run re-logs steps; the later line wins
    return out


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def ember_train(cfg: Path, *overrides: str, nproc: int = 1, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "ember", "train", str(cfg), "--no-sample", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra, "-m", "ember", "train", str(cfg), "--no-sample", *overrides]
    return run(cmd)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> tuple[Path, dict[int, float]]:
    """One process, micro-batch 8: the losses every strategy must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp, corpus)
    ember_train(cfg, "logging.run_name=single")
    return cfg, losses(tmp / "runs" / "single")


def assert_close(got: dict[int, float], want: dict[int, float], tol: float = 1e-5) -> None:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for step in want:
        assert abs(got[step] - want[step]) <= tol * max(1.0, abs(want[step])), (step, got[step], want[step])


STRATEGIES = {
    "ddp": ["distributed.strategy=ddp"],
    "ddp-accumulation": ["distributed.strategy=ddp", "training.batch_size=2", "training.gradient_accumulation_steps=2"],
    "fsdp-full-shard": ["distributed.strategy=fsdp"],
    "fsdp-shard-grad-op-accumulation": [
        "distributed.strategy=fsdp",
        "distributed.fsdp_config.sharding_strategy=SHARD_GRAD_OP",
        "training.batch_size=2",
        "training.gradient_accumulation_steps=2",
    ],
    "fsdp-no-shard": ["distributed.strategy=fsdp", "distributed.fsdp_config.sharding_strategy=NO_SHARD"],
    "fsdp-hybrid": ["distributed.strategy=fsdp", "distributed.fsdp_config.sharding_strategy=HYBRID_SHARD", "distributed.fsdp_config.replicate_degree=2"],
    "fsdp-activation-checkpointing": [
        "distributed.strategy=fsdp",
        "distributed.fsdp_config.activation_checkpointing=true",
        "distributed.fsdp_config.activation_checkpointing_policy=contiguous",
    ],
    "deepspeed-zero0": ["distributed.strategy=deepspeed", "distributed.deepspeed_config={zero_optimization: {stage: 0}}"],
    "deepspeed-zero1": ["distributed.strategy=deepspeed", "distributed.deepspeed_config={zero_optimization: {stage: 1}}"],
    "deepspeed-zero2-accumulation": [
        "distributed.strategy=deepspeed",
        "distributed.deepspeed_config={zero_optimization: {stage: 2}}",
        "training.batch_size=2",
        "training.gradient_accumulation_steps=2",
    ],
    "deepspeed-zero3": ["distributed.strategy=deepspeed", "distributed.deepspeed_config={zero_optimization: {stage: 3}}"],
    "deepspeed-zero3-offload": [
        "distributed.strategy=deepspeed",
        "distributed.deepspeed_config={zero_optimization: {stage: 3, offload_optimizer: {device: cpu}, offload_param: {device: cpu}}}",
    ],
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_ranks_train_like_one_process(name, reference, tmp_path):
    cfg, want = reference
    overrides = STRATEGIES[name]
    batch = [o for o in overrides if o.startswith("training.batch_size")] or ["training.batch_size=4"]
    rest = [o for o in overrides if not o.startswith("training.batch_size")]
    ember_train(cfg, f"logging.run_dir={tmp_path / 'runs'}", "logging.run_name=r", *batch, *rest, nproc=2)
    assert_close(losses(tmp_path / "runs" / "r"), want)
    assert (tmp_path / "runs" / "r" / "checkpoints" / f"step-{STEPS:08d}").is_dir()


def test_deepspeed_launcher(reference, tmp_path):
    cfg, want = reference
    launcher = str(Path(sys.executable).parent / "deepspeed")  # the launcher installed beside this Python
    run([launcher, "--num_gpus", "2", "--module", "ember", "train", str(cfg), "--no-sample", f"logging.run_dir={tmp_path / 'runs'}", "logging.run_name=r", "distributed.strategy=deepspeed", "training.batch_size=4"])
    assert_close(losses(tmp_path / "runs" / "r"), want)


@pytest.mark.parametrize("first,second", [("single", "fsdp"), ("fsdp", "single"), ("ddp", "fsdp")])
def test_checkpoint_moves_between_world_sizes_and_strategies(first, second, reference, tmp_path):
    cfg, want = reference
    settings = {
        "single": (1, ["distributed.strategy=single", "training.batch_size=8"]),
        "fsdp": (2, ["distributed.strategy=fsdp", "training.batch_size=4"]),
        "ddp": (2, ["distributed.strategy=ddp", "training.batch_size=4"]),
    }
    common = [f"logging.run_dir={tmp_path / 'runs'}", "logging.run_name=r"]
    n1, o1 = settings[first]
    ember_train(cfg, *common, *o1, f"training.max_tokens={3 * 8 * 32}", nproc=n1)
    n2, o2 = settings[second]
    ember_train(cfg, *common, *o2, "--resume", "auto", nproc=n2)
    assert_close(losses(tmp_path / "runs" / "r"), want)


@pytest.mark.parametrize(
    "stage,first,second",
    [
        (1, 2, 1),  # the second run without any launcher
        (2, 1, 2),
        (3, 2, 1),
    ],
)
def test_deepspeed_checkpoint_moves_between_world_sizes(stage, first, second, reference, tmp_path):
    cfg, want = reference
    common = [f"logging.run_dir={tmp_path / 'runs'}", "logging.run_name=r", "distributed.strategy=deepspeed",
              f"distributed.deepspeed_config={{zero_optimization: {{stage: {stage}}}}}"]
    ember_train(cfg, *common, f"training.batch_size={8 // first}", f"training.max_tokens={3 * 8 * 32}", nproc=first)
    ember_train(cfg, *common, f"training.batch_size={8 // second}", "--resume", "auto", nproc=second)
    assert_close(losses(tmp_path / "runs" / "r"), want)
    step = tmp_path / "runs" / "r" / "checkpoints" / "step-00000003"
    assert (step / "deepspeed-universal").is_dir() and (step / "deepspeed").is_dir()  # converted beside the original
    if stage == 2:  # another strategy says what it cannot load
        cmd = [sys.executable, "-m", "ember", "train", str(cfg), "--no-sample", *common[:2], "distributed.strategy=single", "--resume", "auto"]
        out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and "written by the deepspeed strategy" in out.stderr, out.stderr[-2000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback(reference, tmp_path):
    """Two torchrun launchers, one process each, meeting at a c10d rendezvous endpoint."""
    cfg, want = reference
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}", "--rdzv-id=ember-test", "-m", "ember", "train", str(cfg), "--no-sample",
        f"logging.run_dir={tmp_path / 'runs'}", "logging.run_name=r", "distributed.strategy=fsdp", "training.batch_size=4",
    ]  # fmt: skip
    nodes = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-3000:] for o in outputs)
    assert_close(losses(tmp_path / "runs" / "r"), want)


def worker_pids(run_name: str) -> dict[int, int]:
    """LOCAL_RANK -> pid of the training processes of a run (not the launcher)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"ember" in args and b"train" in args and f"logging.run_name={run_name}".encode() in args and b"LOCAL_RANK" in env:
            found[int(env[b"LOCAL_RANK"])] = int(entry.name)
    return found


def test_killed_rank_restarts_and_resumes(reference, tmp_path):
    """A rank killed with SIGKILL under --max-restarts 1: torchrun restarts the job, which
    resumes from the latest checkpoint by itself and ends with the uninterrupted losses."""
    cfg, want = reference
    run_dir = tmp_path / "runs" / "ft"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
        "-m", "ember", "train", str(cfg), "--no-sample", "--resume", "auto", f"logging.run_dir={tmp_path / 'runs'}",
        "logging.run_name=ft", "distributed.strategy=fsdp", "training.batch_size=4", "checkpoint.every_n_steps=2",
    ]  # fmt: skip
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    killed = False
    while time.monotonic() < deadline and job.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 3:
            pids = worker_pids("ft")
            if 1 in pids:
                os.kill(pids[1], signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    output = job.communicate(timeout=600)[0]
    assert killed, output[-3000:]
    assert job.returncode == 0, output[-5000:]
    assert "resumed from" in output
    assert_close(losses(run_dir), want)


def test_impossible_combinations_are_refused(corpus, tmp_path, monkeypatch):
    base = {"model": {"preset": "tiny"}, "data": {"train": "x", "seq_len": 32}}
    with pytest.raises(ValueError, match="fp16-mixed is not supported with FSDP"):
        make_strategy(config_from_dict({**base, "training": {"precision": "fp16-mixed"}, "distributed": {"strategy": "fsdp"}}))
    with pytest.raises(ValueError, match="unknown policy 'sometimes'"):
        make_strategy(config_from_dict({**base, "distributed": {"strategy": "fsdp", "fsdp_config": {"activation_checkpointing": "sometimes"}}}))
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(ValueError, match="DeepSpeed is not installed: pip install deepspeed"):
        make_strategy(config_from_dict({**base, "distributed": {"strategy": "deepspeed"}}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="'single' but WORLD_SIZE is 2"):
        make_strategy(config_from_dict({**base, "distributed": {"strategy": "single"}}))


def test_hybrid_shard_needs_enough_ranks(corpus, tmp_path):
    cfg = write_config(tmp_path, corpus)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "ember", "train", str(cfg), "--no-sample",
         "distributed.strategy=fsdp", "distributed.fsdp_config.sharding_strategy=HYBRID_SHARD"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    assert "HYBRID_SHARD with 1 rank(s)" in out.stdout + out.stderr


def test_deepspeed_config_must_agree_with_training(corpus, tmp_path):
    from ember.distributed.deepspeed import build_deepspeed_config

    raw = {"model": {"preset": "tiny"}, "data": {"train": "x", "seq_len": 32}, "training": {"batch_size": 4, "gradient_accumulation_steps": 8}}
    seed_ds = {"train_batch_size": 32, "fp16": {"enabled": True}, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    cfg = config_from_dict({**raw, "distributed": {"strategy": "deepspeed", "deepspeed_config": seed_ds}, "training": {**raw["training"], "precision": "fp16-mixed"}})
    ds = build_deepspeed_config(cfg, world_size=1)
    assert ds["train_batch_size"] == 32 and ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="train_batch_size is 32 but Ember's training settings give 64"):
        build_deepspeed_config(cfg, world_size=2)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(seed_ds))
    cfg.distributed.deepspeed_config = str(path)
    assert build_deepspeed_config(cfg, world_size=1)["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="ds.json: line 1"):
        build_deepspeed_config(cfg, world_size=1)


# The names of this process's threads that belong to a gloo process group.
GROUP_THREADS = """
def group_threads():
    import os
    names = []
    for t in os.listdir('/proc/self/task'):
        try:
            names.append(open(f'/proc/self/task/{t}/comm').read().strip())
        except OSError:
            pass  # the thread ended meanwhile
    return sorted(n for n in names if 'gloo' in n)
"""


def test_user_guide_calls(tmp_path):
    cfg = get_fsdp_config(mixed_precision=True, sharding_strategy="FULL_SHARD", checkpoint_activation=True, activation_checkpointing_policy="contiguous")
    assert (cfg.sharding_strategy, cfg.mixed_precision, cfg.activation_checkpointing, cfg.activation_checkpointing_policy) == ("FULL_SHARD", True, True, "contiguous")
    with pytest.raises(ValueError, match="sharding_strategy"):
        get_fsdp_config(sharding_strategy="EVERYTHING")
    script = tmp_path / "ddp_script.py"
    script.write_text(
        GROUP_THREADS
        + """
import sys, pathlib
import torch, torch.distributed as dist
from ember.distributed import setup_ddp, setup_model_with_ddp
strategy = setup_ddp(backend='gloo', find_unused_parameters=False)
torch.manual_seed(dist.get_rank())
model = setup_model_with_ddp(torch.nn.Linear(3, 1))
model(torch.randn(4, 3)).sum().backward()
g = model.module.weight.grad.clone(); dist.all_reduce(g); g /= dist.get_world_size()
assert torch.allclose(g, model.module.weight.grad), 'gradients were not averaged'
while_held = group_threads()
del model
dist.destroy_process_group()
pathlib.Path(sys.argv[1], f'rank{strategy.rank}.txt').write_text(f'{strategy.rank} {strategy.world_size} {bool(while_held)} {group_threads()}')
"""
    )
    # Each rank reports in its own file: the ranks' prints to one stdout can interleave.
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), str(tmp_path)])
    # The group had threads; once the script let go of the model, leaving the group ended
    # them (left running into interpreter shutdown, they can abort the finished process).
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["0 2 True []", "1 2 True []"]


TRAIN_SCRIPT = """
import os, sys, pathlib, yaml
from ember.config import config_from_dict
from ember.train.orchestrator import PretrainingOrchestrator
cfg, strategy, out, fail = sys.argv[1:5]
raw = yaml.safe_load(open(cfg))
raw['distributed'] = {'strategy': strategy}
raw['training'].update(batch_size=4, max_steps=2)
raw['logging'].update(run_dir=out, run_name='r')
orchestrator = PretrainingOrchestrator(config_from_dict(raw))
s = orchestrator.strategy
while_held = []
release = s.release
def recording_release():
    while_held.extend(group_threads())
    release()
s.release = recording_release
if fail == 'fail' and os.environ['RANK'] == '0':
    def clip_grad_norm(max_norm):
        raise RuntimeError('boom on rank 0')
    s.clip_grad_norm = clip_grad_norm  # the peer goes on into the next collective
orchestrator.train()
pathlib.Path(out, f"rank{os.environ['RANK']}.txt").write_text(f'{orchestrator.model} {bool(while_held)} {group_threads()}')
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_a_finished_run_leaves_no_group_threads(strategy, reference, tmp_path):
    """`ember train` releases everything that holds the group before leaving it."""
    cfg, _ = reference
    script = tmp_path / "train_script.py"
    script.write_text(GROUP_THREADS + TRAIN_SCRIPT)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), str(cfg), strategy, str(tmp_path), "-"])
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["None True []", "None True []"]


def test_a_rank_that_fails_reports_and_ends_the_job(reference, tmp_path):
    """Rank 0 fails mid-step while rank 1 waits for it in a collective: the error is
    printed and the job ends at once, instead of waiting out the collective timeout."""
    cfg, _ = reference
    script = tmp_path / "train_script.py"
    script.write_text(GROUP_THREADS + TRAIN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), str(cfg), "ddp", str(tmp_path), "fail"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert "RuntimeError: boom on rank 0" in out.stdout + out.stderr


def test_checkpoint_metadata_cannot_run_code(tmp_path):
    from ember.distributed.checkpoint_io import SafeFileSystemReader

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="posix.system|os.system|not a checkpoint metadata type"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()


def test_sigterm_to_torchrun_saves_on_every_rank_and_resumes(reference, tmp_path):
    """A scheduler's SIGTERM reaches torchrun, which passes it to each rank: the ranks agree on
    the step, save it together and stop; the checkpoint resumes on 2 ranks."""
    cfg, _ = reference
    run_dir = tmp_path / "runs" / "pre"
    common = ["-m", "ember", "train", str(cfg), "--no-sample", f"logging.run_dir={tmp_path / 'runs'}", "logging.run_name=pre",
              "distributed.strategy=fsdp", "training.batch_size=4", "checkpoint.every_n_steps=null"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    job = subprocess.Popen([*launch, *common, "training.max_steps=400"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ((run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 2):
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    output = job.communicate(timeout=120)[0]
    assert job.returncode != 0
    stopped_at = max(losses(run_dir))
    saved = run_dir / "checkpoints" / f"step-{stopped_at:08d}"
    assert stopped_at < 400 and "continue with --resume auto" in output, output[-3000:]
    assert sorted(p.name for p in saved.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # both ranks saved
    resumed = run([*launch, *common, f"training.max_steps={stopped_at + 1}", "--resume", "auto"])
    assert f"resumed from {saved} at step {stopped_at}" in resumed.stderr + resumed.stdout
    assert max(losses(run_dir)) == stopped_at + 1


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_the_sample_is_written_under_a_sharding_strategy(strategy, reference, tmp_path):
    """ember train prints a sample at the end; with sharded weights it used to fail in generate."""
    cfg, _ = reference
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ember", "train", str(cfg),
           f"logging.run_dir={tmp_path / 'runs'}", f"distributed.strategy={strategy}", "training.batch_size=4", "training.max_steps=2",
           "checkpoint.every_n_steps=null", "checkpoint.export_hf=false", "--sample-prompt", "def "]
    out = run(cmd)
    printed = out.stdout.split("sample:\n")
    assert len(printed) == 2, out.stdout[-2000:]  # the main rank prints it once
    text = printed[1].split("-" * 60)[1].strip("\n")
    assert text.startswith("def ") and len(text) > len("def ")
