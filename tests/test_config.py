"""Configuration: the seed guide's YAML, shipped configs, overrides, and error reporting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ember.config import ConfigError, builtin_configs, config_from_dict, load_config, parse_duration
from ember.model import LlamaConfig

SEED_YAML = Path(__file__).parent / "data" / "seed_pretraining.yaml"


def seed_with_data(tmp_path: Path) -> Path:
    """The user guide's example, unchanged, plus the data section it lacks."""
    path = tmp_path / "continual_llama_3.1_7b.yaml"
    path.write_text(SEED_YAML.read_text() + "\ndata:\n  train: data/tokens/train\n  seq_len: 4096\n")
    return path


def test_seed_yaml_loads_unchanged_with_a_data_section(tmp_path):
    cfg = load_config(seed_with_data(tmp_path))
    llama = cfg.model.llama_config()
    assert (llama.vocab_size, llama.hidden_size, llama.intermediate_size) == (32000, 4096, 11008)
    assert (llama.num_hidden_layers, llama.num_attention_heads, llama.max_position_embeddings) == (32, 32, 4096)
    assert llama.rms_norm_eps == 1e-6
    t = cfg.training
    assert (t.batch_size, t.gradient_accumulation_steps, t.warmup_steps, t.max_steps) == (32, 8, 2000, 100000)
    assert (t.learning_rate, t.lr_scheduler, t.weight_decay, t.clip_grad_norm) == (3e-4, "cosine", 0.1, 1.0)
    assert cfg.distributed.strategy == "fsdp"
    f = cfg.distributed.fsdp_config
    assert (f.sharding_strategy, f.mixed_precision, f.activation_checkpointing) == ("FULL_SHARD", True, True)
    assert cfg.run_name == "continual_llama_3.1_7b"


def test_size_selects_a_preset_and_explicit_fields_override_it():
    cfg = config_from_dict({"model": {"type": "llama", "size": "8B", "num_hidden_layers": 2}, "data": {"train": "x"}})
    llama = cfg.model.llama_config()
    assert llama == LlamaConfig.from_preset("llama3.1-8b", num_hidden_layers=2)
    cfg = config_from_dict({"model": {"preset": "llama3.2-1b"}, "data": {"train": "x"}})
    assert cfg.model.llama_config() == LlamaConfig.from_preset("llama3.2-1b")


@pytest.mark.parametrize("name", sorted(builtin_configs()))
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    if cfg.model.init_from is None:  # otherwise the architecture is read from the checkpoint when the orchestrator is built
        cfg.model.llama_config()
    assert cfg.run_name == name
    # The saved form loads back to the same config.
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()


def test_shipped_configs_cover_the_documented_runs():
    assert {"quickstart", "llama3.2-1b", "continual_llama3.1_8b_fsdp", "deepspeed_zero3_offload"} <= set(builtin_configs())
    assert load_config("deepspeed_zero3_offload").distributed.deepspeed_config["zero_optimization"]["stage"] == 3


def test_all_problems_are_reported_together_with_key_paths(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "llama3.2-1b", "num_attention_heads": 30, "num_key_value_heads": 7},
                "training": {"max_stepz": 10, "batch_size": "eight", "learning_rate": 1e-3},
                "data": {"train": "x"},
                "logging": {"verbose": True},
            }
        )
    )
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    keys = [k for k, _ in ei.value.problems]
    assert "training.max_stepz" in keys and "training.batch_size" in keys and "logging.verbose" in keys
    assert any(k.startswith("model.num_") for k in keys), keys
    text = str(ei.value)
    assert str(path) in text
    assert "did you mean 'max_steps'" in text
    assert "expected int, got 'eight'" in text


def test_inconsistent_values_are_reported_together():
    raw = {
        "model": {"preset": "tiny", "hidden_size": 100, "num_attention_heads": 3, "num_key_value_heads": 2},
        "training": {"warmup_steps": 50, "max_steps": 10, "min_lr_ratio": 2.0},
        "data": {"train": "x", "seq_len": 100000},
    }
    with pytest.raises(ConfigError) as ei:
        config_from_dict(raw)
    keys = {k for k, _ in ei.value.problems}
    assert {"training.warmup_steps", "training.min_lr_ratio", "data.seq_len"} <= keys
    assert any(k.startswith("model.") for k in keys), ei.value.problems
    assert "beyond training.max_steps" in str(ei.value)


def test_missing_data_is_an_error():
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"model": {"preset": "tiny"}})
    assert "data.train" in {k for k, _ in ei.value.problems}


def test_overrides_apply_and_are_checked(tmp_path):
    path = seed_with_data(tmp_path)
    cfg = load_config(path, ["training.max_steps=100", "training.warmup_steps=10", "data.train={a: 2, b: 1}", "logging.run_name=x"])
    assert cfg.training.max_steps == 100 and cfg.data.train == {"a": 2.0, "b": 1.0} and cfg.run_name == "x"
    with pytest.raises(ConfigError, match="training.max_stepz: unknown key"):
        load_config(path, ["training.max_stepz=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["training.max_steps"])
    with pytest.raises(ConfigError, match="is not a section"):
        load_config(path, ["training.max_steps.x=1"])


def test_yaml_quirks_and_syntax_errors(tmp_path):
    # YAML 1.1 reads 3e-4 as a string; a float field accepts it anyway.
    cfg = config_from_dict({"training": {"learning_rate": "3e-4"}, "data": {"train": "x"}})
    assert cfg.training.learning_rate == 3e-4
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  preset: tiny\n training: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml.*\n.*line 3"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_durations():
    assert parse_duration("90m") == 5400 and parse_duration("2h") == 7200 and parse_duration(30) == 30
    with pytest.raises(ValueError):
        parse_duration("soon")
    with pytest.raises(ConfigError, match="training.time_budget"):
        config_from_dict({"training": {"time_budget": "soon"}, "data": {"train": "x"}})


def test_more_mistakes_caught_before_training(tmp_path, monkeypatch):
    raw = {
        "model": {"preset": "tiny", "size": "8B"},
        "training": {"seed": -1, "betas": [0.9]},
        "data": {"train": []},
    }
    with pytest.raises(ConfigError) as ei:
        config_from_dict(raw)
    problems = dict(ei.value.problems)
    assert "not both" in problems["model.size"]
    assert "must not be negative" in problems["training.seed"]
    assert "required" in problems["data.train"]
    assert "a list of 2 values" in problems["training.betas"]
    (tmp_path / "somedir").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_config("somedir")
    (tmp_path / "quickstart").mkdir()  # a folder named like a built-in config does not shadow it
    assert load_config("quickstart").run_name == "quickstart"


def test_fsdp_activation_checkpointing_is_an_alias_of_the_model_key():
    base = {"model": {"preset": "tiny"}, "data": {"train": "x", "seq_len": 32}}
    fsdp = {"activation_checkpointing": True, "activation_checkpointing_policy": "selective"}
    cfg = config_from_dict({**base, "distributed": {"strategy": "fsdp", "fsdp_config": fsdp}})
    assert cfg.activation_checkpointing == "selective"  # what every strategy applies
    # Saved as written, and read back to the same config.
    assert config_from_dict(cfg.to_dict()) == cfg
    # The guide's "contiguous" is Ember's "full"; Ember's own key alone works the same.
    cfg = config_from_dict({**base, "distributed": {"fsdp_config": {"activation_checkpointing": True, "activation_checkpointing_policy": "contiguous"}}})
    assert cfg.activation_checkpointing == "full"
    assert config_from_dict({**base, "model": {"preset": "tiny", "activation_checkpointing": "full"}}).activation_checkpointing == "full"


def test_both_activation_checkpointing_keys_are_refused_when_the_config_is_read():
    raw = {
        "model": {"preset": "tiny", "activation_checkpointing": "full"},
        "data": {"train": "x", "seq_len": 32},
        "distributed": {"fsdp_config": {"activation_checkpointing": True}},
    }
    with pytest.raises(ConfigError, match=r"model\.activation_checkpointing.*distributed\.fsdp_config\.activation_checkpointing.*give only one"):
        config_from_dict(raw)
    # Set in code after the config was read, both are still refused before training starts.
    cfg = config_from_dict({**raw, "distributed": {}})
    cfg.distributed.fsdp_config.activation_checkpointing = "selective"
    with pytest.raises(ValueError, match="give only one"):
        cfg.activation_checkpointing
    cfg.distributed.fsdp_config.activation_checkpointing = "sometimes"
    with pytest.raises(ValueError, match=r"distributed\.fsdp_config\.activation_checkpointing: unknown policy 'sometimes'"):
        cfg.activation_checkpointing
