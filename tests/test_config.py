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


# -- files and values that must be refused up front, naming the file, line or key ----------


def test_a_config_that_is_not_utf8_text_is_refused_naming_the_file_and_offset(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  preset: tiny\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as ei:
        load_config(bad)
    assert ei.value.source == str(bad)
    ((where, message),) = ei.value.problems
    assert where == "line 3, byte 27" and "not UTF-8 text" in message and "\\xe9" in message
    # Valid UTF-8 that holds characters YAML refuses (a binary file of zeros, say).
    binary = tmp_path / "zeros.yaml"
    binary.write_bytes(b"model:\n" + bytes(64))
    with pytest.raises(ConfigError) as ei:
        load_config(binary)
    ((where, message),) = ei.value.problems
    assert ei.value.source == str(binary) and where.startswith("line 2") and "#x0000" in message and "binary" in message


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(
        "model:\n"  # 1
        "  preset: tiny\n"  # 2
        "training:\n"  # 3
        "  max_steps: 10\n"  # 4
        "  batch_size: 2\n"  # 5
        "  batch_size: 4\n"  # 6
        "data:\n"  # 7
        "  train: x\n"  # 8
        "  train: y\n"  # 9
        "  train: z\n"  # 10
        "logging: {run_name: a}\n"  # 11
        "training:\n"  # 12
        "  warmup_steps: 1\n"  # 13
    )
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert ei.value.source == str(path)
    assert ei.value.problems == [
        ("training", "given twice, at lines 3 and 12; give each key once (YAML would keep only the last)"),
        ("training.batch_size", "given twice, at lines 5 and 6; give each key once (YAML would keep only the last)"),
        ("data.train", "given 3 times, at lines 8, 9 and 10; give each key once (YAML would keep only the last)"),
    ]


def test_merge_keys_and_overrides_still_replace_values(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("model: {preset: tiny}\ntraining: {batch_size: 2, max_steps: 10, warmup_steps: 1}\ndata: {train: x, seq_len: 32}\n")
    cfg = load_config(path, ["training.batch_size=3", "training.batch_size=5"])
    assert cfg.training.batch_size == 5
    # A YAML merge key (<<) followed by the key it replaces is not a repeated key.
    path.write_text(
        "model: {preset: tiny}\n"
        "training:\n  <<: {batch_size: 2, max_steps: 10}\n  batch_size: 4\n  warmup_steps: 1\n"
        "data: {train: x, seq_len: 32}\n"
    )
    cfg = load_config(path)
    assert (cfg.training.batch_size, cfg.training.max_steps) == (4, 10)
    # Only safe YAML is read, as yaml.safe_load reads it.
    path.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_config(path)
    # An integer Python refuses to read (over 4,300 digits) is reported at its line.
    path.write_text("model: {preset: tiny}\ntraining:\n  max_steps: 1" + "0" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"line 3, column 14: YAML error: an integer of 5001 characters, too long to read"):
        load_config(path)
    # Within one override's value, a repeated key is refused like one in the file.
    with pytest.raises(ConfigError, match=r"data\.train\.a: given twice in the override"):
        load_config("quickstart", ["data.train={a: 1, a: 2}"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.learning_rate=.inf", "training.learning_rate"),
        ("training.learning_rate=nan", "training.learning_rate"),
        ("training.clip_grad_norm=.nan", "training.clip_grad_norm"),
        ("training.min_lr_ratio=.nan", "training.min_lr_ratio"),
        ("training.weight_decay=.inf", "training.weight_decay"),
        ("training.eps=.inf", "training.eps"),
        ("training.betas=[0.9, .nan]", "training.betas"),
        ("training.time_budget=.inf", "training.time_budget"),
        ("data.train={a: .inf, b: 1}", "data.train"),
        ("model.rms_norm_eps=.inf", "model.rms_norm_eps"),
        ("model.rope_theta=.nan", "model.rope_theta"),
        ("model.initializer_range=.inf", "model.initializer_range"),
        ("training.learning_rate=1" + "0" * 400, "training.learning_rate"),
        ("training.time_budget=" + "9" * 400 + "d", "training.time_budget"),
    ],
)
def test_float_keys_refuse_infinity_and_nan(override, key):
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", [override])
    problems = dict(ei.value.problems)
    assert "finite" in problems[key], ei.value.problems


def test_rope_scaling_numbers_must_be_finite():
    scaling = "{rope_type: llama3, factor: .inf, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192}"
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", [f"model.rope_scaling={scaling}"])
    assert "finite" in dict(ei.value.problems)["model.rope_scaling.factor"]


@pytest.mark.parametrize(
    "key",
    [
        "training.batch_size",
        "training.gradient_accumulation_steps",
        "training.max_steps",
        "training.max_tokens",
        "training.seed",
        "training.eval_batches",
        "data.seq_len",
        "data.num_threads",
        "data.prefetch",
        "checkpoint.every_n_steps",
        "checkpoint.keep_last",
        "logging.log_every",
        "model.hidden_size",
        "model.vocab_size",
    ],
)
def test_integers_beyond_64_bits_are_refused_naming_the_key(key):
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", [f"{key}=100000000000000000000", "training.warmup_steps=0"])
    problems = dict(ei.value.problems)
    assert key in problems and "100000000000000000000" in problems[key], ei.value.problems


def test_sizes_that_fit_64_bits_but_no_memory_are_refused():
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", ["training.batch_size=10000000000", "data.num_threads=100000", "model.hidden_size=4294967296"])
    problems = dict(ei.value.problems)
    assert "tokens per micro-batch" in problems["training.batch_size"]
    assert "at most 1024" in problems["data.num_threads"]
    assert "at most 2147483647" in problems["model.hidden_size"]


def test_prefetch_is_capped_and_the_message_says_the_memory():
    cfg = load_config("quickstart", ["data.prefetch=64"])
    assert cfg.data.prefetch == 64
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", ["data.prefetch=1000000", "training.batch_size=8", "data.seq_len=512"])
    message = dict(ei.value.problems)["data.prefetch"]
    # 8 x 512 tokens x 16 bytes = 64 KiB a batch; a million of them is 61.0 GiB.
    assert "at most 64" in message and "61.0 GiB" in message, message


def test_checkpoint_and_run_directories_that_are_files_are_refused(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("")
    base = [f"logging.run_dir={tmp_path / 'runs'}"]
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", [*base, f"checkpoint.dir={blocker}"])
    assert dict(ei.value.problems)["checkpoint.dir"] == f"{blocker} is a file, not a directory; name a directory, or move the file"
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", [*base, f"checkpoint.dir={blocker / 'ckpt'}"])
    assert f"{blocker} is a file, so {blocker / 'ckpt'}, the checkpoint directory, cannot be made under it" in dict(ei.value.problems)["checkpoint.dir"]
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", [f"logging.run_dir={blocker}"])
    assert f"{blocker} is a file" in dict(ei.value.problems)["logging.run_dir"]
    # The default checkpoint directory, <run dir>/checkpoints, is checked too.
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart" / "checkpoints").write_text("")
    with pytest.raises(ConfigError) as ei:
        load_config("quickstart", base)
    assert "checkpoints is a file" in dict(ei.value.problems)["checkpoint.dir"]
    (tmp_path / "runs" / "quickstart" / "checkpoints").unlink()
    assert load_config("quickstart", base).checkpoint_dir == tmp_path / "runs" / "quickstart" / "checkpoints"
