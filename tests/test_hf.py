"""Hugging Face Llama checkpoints in and out: logits, round trips, continual pretraining, conversion."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from ember.config import config_from_dict
from ember.data import TokenLoader
from ember.model.hf import config_from_hf, load_hf_checkpoint, save_hf_checkpoint
from ember.train import PretrainingOrchestrator
from ember.train.convert import convert_to_hf, load_checkpoint_weights

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

SHAPES = {
    "gqa-llama3-rope-tied": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    "mha-untied": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "mqa-head-dim-llama3-untied": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, head_dim=32, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False, rope_theta=500000.0),
}


def hf_model(tmp_path: Path, name: str, vocab: int = 131, **save_kwargs) -> tuple[transformers.LlamaForCausalLM, Path]:
    cfg = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5, **SHAPES[name])
    torch.manual_seed(abs(hash(name)) % 1000)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    path = tmp_path / name
    model.save_pretrained(path, **save_kwargs)
    return model, path


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_transformers(name, tmp_path):
    hf, path = hf_model(tmp_path, name)
    ours = load_hf_checkpoint(path).eval()
    ids = torch.randint(0, 131, (3, 37))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SHAPES))
def test_round_trip_is_bit_exact(name, tmp_path):
    _, path = hf_model(tmp_path, name)
    out = save_hf_checkpoint(load_hf_checkpoint(path), tmp_path / "back")
    a, b = load_file(path / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert config_from_hf(path) == config_from_hf(out)


def test_bf16_checkpoint_round_trip_and_sharded_index(tmp_path):
    hf, _ = hf_model(tmp_path, "mha-untied")
    src = tmp_path / "bf16"
    hf.to(torch.bfloat16).save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    ours = load_hf_checkpoint(src)  # float32 in memory
    out = save_hf_checkpoint(ours, tmp_path / "out", dtype=torch.bfloat16, shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for n, p in hf.named_parameters():
        assert torch.equal(p, reloaded.get_parameter(n)), n


def test_pickle_weights_are_refused_and_never_loaded(tmp_path):
    _, path = hf_model(tmp_path, "mha-untied")
    os.remove(path / "model.safetensors")
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (path / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match=r"pytorch_model.bin: pickle checkpoints are not loaded.*save_pretrained"):
        load_hf_checkpoint(path)
    assert not marker.exists()


def test_mismatches_name_every_tensor(tmp_path):
    _, path = hf_model(tmp_path, "mha-untied")
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    tensors["model.extra.weight"] = torch.zeros(1)
    from safetensors.torch import save_file

    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError) as ei:
        load_hf_checkpoint(path)
    msg = str(ei.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensors: model.extra.weight" in msg
    assert "model.layers.0.self_attn.q_proj.weight: checkpoint [3, 3], model [48, 48]" in msg
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: model_type is 'gpt2'"):
        load_hf_checkpoint(path)


def continual_config(tmp_path: Path, corpus: Path, init_from: Path, **training) -> dict:
    return {
        "model": {"init_from": str(init_from)},
        "training": {"batch_size": 4, "max_steps": 4, "warmup_steps": 1, "learning_rate": 1e-3, "seed": 5, **training},
        "data": {"train": "builtin:stdlib", "seq_len": 32, "cache_dir": str(corpus)},
        "checkpoint": {"every_n_steps": 2},
        "logging": {"run_dir": str(tmp_path / "runs"), "run_name": "cont", "log_every": 1, "progress_bar": False},
    }


def first_loss(run_dir: Path) -> float:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("step") == 1 and "loss" in record:
            return record["loss"]
    raise AssertionError("no loss at step 1")


def test_continual_pretraining_starts_at_the_checkpoint_loss_and_exports_back(tmp_path, corpus):
    hf, path = hf_model(tmp_path, "gqa-llama3-rope-tied", vocab=259)
    raw = continual_config(tmp_path, corpus, path)
    summary = PretrainingOrchestrator(config_from_dict(raw)).train()
    # The loss logged at step 1 is measured before the first update: the HF model's own loss.
    cfg = config_from_dict(raw)
    stdlib_train = next(Path(corpus).glob("stdlib-byte-*/train"))
    batch = next(iter(TokenLoader(stdlib_train, seq_len=32, batch_size=4, seed=5)))
    with torch.no_grad():
        logits = hf(batch["input_ids"]).logits
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, 259), batch["labels"].reshape(-1)).item()
    assert abs(first_loss(Path(summary["run_dir"])) - want) < 1e-5
    assert cfg.model.llama_config().tie_word_embeddings
    # The run's final weights come back as a HF checkpoint with the same logits as Ember's model.
    exported = transformers.LlamaForCausalLM.from_pretrained(summary["hf_dir"]).eval()
    ids = torch.randint(0, 259, (2, 20))
    ours, _ = load_checkpoint_weights(Path(summary["run_dir"]))
    with torch.no_grad():
        model = load_hf_checkpoint(summary["hf_dir"]).eval()
        torch.testing.assert_close(model(ids), exported(ids).logits, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(ours[k], model.state_dict()[k]) for k in ours if not k.startswith("rope"))


@pytest.mark.slow
def test_convert_a_sharded_fsdp_checkpoint(tmp_path, corpus):
    """Two FSDP ranks continue from a HF checkpoint (each reading only its shards); the
    sharded Ember checkpoint converts to a HF checkpoint with the run's final weights."""
    _, path = hf_model(tmp_path, "mha-untied", vocab=259)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(continual_config(tmp_path, corpus, path, batch_size=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ember", "train", str(cfg_path), "--no-sample", "distributed.strategy=fsdp"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    single = continual_config(tmp_path, corpus, path)
    single["logging"]["run_name"] = "single"
    PretrainingOrchestrator(config_from_dict(single)).train()
    assert abs(first_loss(tmp_path / "runs" / "cont") - first_loss(tmp_path / "runs" / "single")) < 1e-5
    out_dir = convert_to_hf(tmp_path / "runs" / "cont", tmp_path / "converted")
    exported = load_file(tmp_path / "runs" / "cont" / "hf" / "model.safetensors")
    converted = load_file(out_dir / "model.safetensors")
    assert exported.keys() == converted.keys()
    assert all(torch.equal(exported[k], converted[k]) for k in exported)
    cli = subprocess.run([sys.executable, "-m", "ember", "convert", str(tmp_path / "runs" / "cont"), "--to", "hf", str(tmp_path / "cli")], capture_output=True, text=True)
    assert cli.returncode == 0 and (tmp_path / "cli" / "config.json").is_file(), cli.stderr


# ---------------------------------------------------------------------------
# Exports replace only what Ember wrote


def tiny_run_config(tmp_path: Path, corpus: Path, max_steps: int) -> dict:
    return {
        "model": {"preset": "tiny", "vocab_size": 259},
        "training": {"batch_size": 2, "max_steps": max_steps, "warmup_steps": 1, "seed": 3},
        "data": {"train": "builtin:stdlib", "seq_len": 32, "cache_dir": str(corpus)},
        "logging": {"run_dir": str(tmp_path / "runs"), "run_name": "r", "progress_bar": False},
    }


def test_a_converted_checkpoint_gives_the_logits_of_the_trained_model(tmp_path, corpus):
    PretrainingOrchestrator(config_from_dict(tiny_run_config(tmp_path, corpus, 2))).train()
    run = tmp_path / "runs" / "r"
    out = subprocess.run([sys.executable, "-m", "ember", "convert", str(run), "--to", "hf", str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    state, arch = load_checkpoint_weights(run)
    from ember.model import Llama

    trained = Llama(arch).eval()
    trained.load_state_dict(state, strict=False)
    ids = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(ids)
        torch.testing.assert_close(load_hf_checkpoint(tmp_path / "out").eval()(ids), want, rtol=0, atol=0)
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_overwrite_replaces_the_earlier_export_and_only_it(tmp_path):
    _, path = hf_model(tmp_path, "mha-untied")
    model = load_hf_checkpoint(path)
    out = tmp_path / "out"
    save_hf_checkpoint(model, out, shard_bytes=30_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds an earlier Hugging Face export"):
        save_hf_checkpoint(model, out)
    save_hf_checkpoint(model, out, overwrite=True)  # one file now: the shards and their index go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "ember_export.json", "model.safetensors", "notes.txt"]
    assert json.loads((out / "ember_export.json").read_text())["files"] == ["config.json", "ember_export.json", "model.safetensors"]
    assert torch.equal(load_hf_checkpoint(out).output.weight, model.output.weight)
    # A file the earlier export did not write, under a name the new one would: refused, nothing changed.
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"new": true}')
    (out / "tokenizer.json").write_text('{"mine": true}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"tokenizer.json would be replaced, but the earlier export's ember_export.json does not list"):
        save_hf_checkpoint(model, out, tokenizer_dir=tokenizer, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mha-untied", "out", "tokenizer"]


@pytest.mark.parametrize("marker", ["{not json", '{"format": "ember-hf-export", "files": ["ember_export.json", "notes.txt"]}', "[]"])
def test_a_marker_ember_did_not_write_is_not_trusted(marker, tmp_path):
    _, path = hf_model(tmp_path, "mha-untied")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "ember_export.json").write_text(marker)
    with pytest.raises(ValueError, match=r"ember_export.json: .*cannot tell which files .* are its own"):
        save_hf_checkpoint(load_hf_checkpoint(path), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["ember_export.json", "notes.txt"]


def test_an_interrupted_replacement_is_not_loaded_and_the_next_export_replaces_it(tmp_path, monkeypatch):
    _, path = hf_model(tmp_path, "mha-untied")
    model = load_hf_checkpoint(path)
    out = tmp_path / "out"
    save_hf_checkpoint(model, out, shard_bytes=30_000)
    (out / "notes.txt").write_text("mine")
    import ember.model.hf as hf

    moves, replace = [], os.replace

    def crash_after_two(src, dst):
        if len(moves) == 2:  # the interim marker and one file have moved in
            raise OSError(28, "No space left on device")
        moves.append(dst)
        replace(src, dst)

    monkeypatch.setattr(hf.os, "replace", crash_after_two)
    with pytest.raises(OSError, match="No space left"):
        save_hf_checkpoint(model, out, overwrite=True)
    monkeypatch.undo()
    assert not json.loads((out / "ember_export.json").read_text())["complete"]
    with pytest.raises(ValueError, match=r"ember_export.json: an export into .* was interrupted"):
        load_hf_checkpoint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mha-untied", "out"]  # its temporary directory removed
    save_hf_checkpoint(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "ember_export.json", "model.safetensors", "notes.txt"]
    assert torch.equal(load_hf_checkpoint(out).output.weight, model.output.weight)


def test_only_temporary_directories_of_finished_exports_are_cleared(tmp_path):
    _, path = hf_model(tmp_path, "mha-untied")
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    crashed = tmp_path / f".out.tmp-{gone.pid}"  # an export whose process died
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    not_ours = tmp_path / f".out.tmp-{gone.pid + 1}"
    not_ours.mkdir()
    (not_ours / "notes.txt").write_text("mine")
    running = tmp_path / f".out.tmp-{os.getppid()}"  # a process still running may still be writing it
    running.mkdir()
    (running / "config.json").write_text("{}")
    save_hf_checkpoint(load_hf_checkpoint(path), tmp_path / "out")
    assert not crashed.exists()
    assert (not_ours / "notes.txt").read_text() == "mine" and (running / "config.json").is_file()


def test_the_run_export_replaces_its_own_earlier_export_and_nothing_else(tmp_path, corpus):
    PretrainingOrchestrator(config_from_dict(tiny_run_config(tmp_path, corpus, 2))).train()
    run = tmp_path / "runs" / "r"
    (run / "hf" / "notes.txt").write_text("mine")
    PretrainingOrchestrator(config_from_dict(tiny_run_config(tmp_path, corpus, 4)), resume="auto").train()
    state, _ = load_checkpoint_weights(run)
    exported = load_hf_checkpoint(run / "hf").state_dict()
    assert all(torch.equal(state[k], exported[k]) for k in state if not k.startswith("rope"))
    assert (run / "hf" / "notes.txt").read_text() == "mine"
    # hf/ holding files without the marker: the run refuses to export into it, before it
    # trains (not after, when the time would be spent), and keeps them.
    (run / "hf" / "ember_export.json").unlink()
    before = {p.name: p.read_bytes() for p in (run / "hf").iterdir()}
    with pytest.raises(ValueError, match=r"/hf: holds files Ember did not write"):
        PretrainingOrchestrator(config_from_dict(tiny_run_config(tmp_path, corpus, 6)), resume="auto").train()
    assert {p.name: p.read_bytes() for p in (run / "hf").iterdir()} == before
    assert not (run / "checkpoints" / "step-00000006").exists()
