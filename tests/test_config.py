"""The training configuration: TOML + dataclasses, every key on the command line, all problems at once."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from loralib.training.config import (
    KEY_SECTIONS,
    SECTIONS,
    ConfigError,
    TrainConfig,
    default_toml,
    load_config,
    reference_markdown,
)

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def test_default_file_is_commented_and_loads_back_to_the_defaults(tmp_path):
    text = default_toml()
    lines = text.splitlines()
    for key in KEY_SECTIONS:
        index = next(i for i, line in enumerate(lines) if line.startswith((f"{key} =", f"# {key} =")))
        assert lines[index - 1].startswith("# "), key  # every key is explained right above it
    parsed = tomllib.loads(text)
    assert set(parsed) == set(SECTIONS)
    loaded = load_config(_write(tmp_path, text))
    expected = TrainConfig().model_dump()
    got = loaded.model_dump()
    assert got["data"].pop("data_dir") == tmp_path / "data"  # relative paths are relative to the file
    expected["data"].pop("data_dir")
    assert got == expected


def test_the_tutorial_flat_layout_and_sections_mean_the_same(tmp_path):
    flat = load_config(_write(tmp_path, 'model_name = "cat"\nrank = 16\nbatch_size = 2\nnum_epochs = 3\n'
                                        'learning_rate = 5e-5\nbase_model = "a/b"\n'))
    nested = load_config(_write(tmp_path, '[model]\nmodel_name = "cat"\nbase_model = "a/b"\n[network]\nrank = 16\n'
                                          '[training]\nbatch_size = 2\nnum_epochs = 3\nlearning_rate = 5e-5\n'))
    assert flat == nested
    assert flat.network.rank == 16 and flat.training.learning_rate == 5e-5 and flat.alpha == 16.0


def test_overrides_beat_the_file_in_every_spelling(tmp_path):
    path = _write(tmp_path, '[network]\nrank = 4\n[training]\nseed = 1\n[data]\ndata_dir = "pics"\n')
    config = load_config(path, {"rank": "32", "training.seed": 7, "noise-offset": "0.1", "data_dir": Path("mine")})
    assert config.network.rank == 32 and config.training.seed == 7 and config.training.noise_offset == 0.1
    assert config.data.data_dir == Path("mine")  # command-line paths stay relative to the working directory
    assert load_config(path).data.data_dir == tmp_path / "pics"


def test_every_problem_is_reported_at_once_with_its_path(tmp_path):
    path = _write(tmp_path, '\n'.join([
        'networ_rank = 4',
        '[network]', 'rank = 0', 'target_modules = "everything"',
        '[training]', 'learning_rate = -1', 'lerning_rate = 1e-4', 'mixed_precision = "fp8"',
        '[data]', 'resolution = 100', 'crop = "middle"',
        '[sampler]', 'x = 1']))
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"batch_size": "two"})
    problems = caught.value.problems
    text = str(caught.value)
    assert len(problems) == 10, problems
    for expected in ("networ_rank: unknown key (did you mean 'rank' or 'network_type'?)", "network.rank: input should be greater than "
                     "or equal to 1 (got 0)", "network.target_modules:", "training.learning_rate: input should be "
                     "greater than 0 (got -1)", "training.lerning_rate: unknown key (did you mean 'learning_rate'?)",
                     "training.mixed_precision:", "data.resolution: must be a multiple of 8", "data.crop:",
                     "sampler: unknown section (did you mean 'sampling'?)", "training.batch_size:"):
        assert expected in text, expected
    assert text.startswith(f"{path} has 10 problems") and "\n" not in text


def test_settings_that_only_fail_together(tmp_path):
    with pytest.raises(ConfigError, match="data.resolution \\(96\\) must be a multiple of data.bucket_step"):
        load_config(None, {"enable_bucket": True, "resolution": 96, "bucket_step": 64})


def test_broken_toml_is_one_line_with_the_place(tmp_path):
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 2"):
        load_config(_write(tmp_path, 'rank = 4\nlearning_rate = = 1\n'))


def test_the_docs_reference_is_the_one_generated_from_the_model():
    assert reference_markdown() in (ROOT / "docs" / "training.md").read_text()


def test_cli_reports_a_bad_config_before_doing_anything(tmp_path, lorareg):
    path = _write(tmp_path, f'rank = -3\nlearning_rate = "fast"\n[output]\noutput_dir = "{tmp_path / "out"}"\n')
    res = lorareg("train", path)
    assert res.code == 1
    assert res.err.startswith(f"error: {path} has 2 problems: network.rank:")
    assert "training.learning_rate: input should be a valid number" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "out").exists()


def test_print_config_is_the_commented_default_with_overrides(lorareg):
    res = lorareg("train", "--print-config")
    assert res.code == 0 and res.out == default_toml()
    res = lorareg("train", "--print-config", "--rank", "16", "--no-cache-latents", "--sample-prompts", "a",
                  "--sample-prompts", "b")
    parsed = tomllib.loads(res.out)
    assert parsed["network"]["rank"] == 16 and parsed["data"]["cache_latents"] is False
    assert parsed["sampling"]["sample_prompts"] == ["a", "b"]


def test_every_key_is_an_option_and_help_needs_no_torch():
    code = ("import sys\nfrom lorareg.cli.main import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY:', sorted(m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "HEAVY: []" in done.stdout
    for key in KEY_SECTIONS:
        assert f"--{key.replace('_', '-')}" in done.stdout, key


def test_new_keys_reject_non_finite_and_absurd_values():
    bad = {"ema_decay": "inf", "huber_c": "nan", "loraplus_lr_ratio": "1e9", "multires_noise_discount": "-0.3",
           "multires_noise_iterations": "1000", "ip_noise_gamma": "inf", "caption_tag_dropout": "1.0",
           "validation_split": "1", "keep_tokens": "-1", "huber_scale": "inf", "optimizer_args": ["d_coef=nan"],
           "block_dims": "4,4", "down_lr_weight": "1,inf", "block_alphas": ",".join(["0"] * 25)}
    with pytest.raises(ConfigError) as caught:
        load_config(None, bad)
    problems = caught.value.problems
    assert len(problems) == len(bad), problems
    for key in bad:
        assert any(p.split(":")[0].endswith("." + key) for p in problems), key
    text = str(caught.value)
    assert "network.block_dims: needs 25 values for SD1/SD2 or 23 for SDXL" in text
    assert "training.optimizer_args: d_coef must be a finite number, not nan" in text
    assert "training.ema_decay: input should be a finite number" in text


def test_feature_combinations_are_checked_together():
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"network_type": "dora", "output_format": "diffusers", "fused_backward_pass": True,
                           "optimizer": "prodigy", "gradient_accumulation_steps": 2, "mask_dir": "masks", "validation_split": 0.2,
                           "validation_dir": "val", "conv_block_dims": ",".join(["2"] * 25)})
    problems = caught.value.problems
    for expected in ('output.output_format = "diffusers" cannot hold DoRA: set output_format = "kohya"',
                     "training.fused_backward_pass works with adafactor, adamw, adam, sgd, not prodigy",
                     "training.fused_backward_pass needs gradient_accumulation_steps = 1",
                     "data.mask_dir is set but masked_loss is off", "set validation_split or validation_dir, not both",
                     'conv_block_dims and conv_block_alphas need target_modules = "locon"'):
        assert any(expected in p for p in problems), (expected, problems)
    assert load_config(None, {"network_type": "loha"}).network.network_type == "loha"  # LyCORIS kinds train
    with pytest.raises(ConfigError, match='"peft" cannot hold LoKr modules'):
        load_config(None, {"network_type": "lokr", "output_format": "peft"})
    with pytest.raises(ConfigError, match="validate_every_n_steps/epochs need validation_split or validation_dir"):
        load_config(None, {"validate_every_n_steps": 5})
    # lists in TOML and comma-separated text on the command line mean the same
    listed = load_config(None, {"block_dims": [4] * 23, "down_lr_weight": "sine+0.5", "optimizer_args": ["betas=0.9,0.99"]})
    assert listed.network.block_dims == ",".join(["4"] * 23) and listed.network.down_lr_weight == "sine+0.5"
    from loralib.training.config import parse_optimizer_args

    assert parse_optimizer_args(["betas=0.9,0.99", "decouple=true", "d_coef=2", "name=x"]) == {
        "betas": (0.9, 0.99), "decouple": True, "d_coef": 2, "name": "x"}


def test_a_missing_optional_optimizer_package_is_one_line_saying_how_to_install_it(lorareg):
    import importlib.util

    assert importlib.util.find_spec("bitsandbytes") is None  # not installed on the test machines
    res = lorareg("train", "--optimizer", "adamw8bit", "--dry-run")
    assert res.code == 1 and "Traceback" not in res.err
    assert ("training.optimizer: adamw8bit needs the bitsandbytes package, which is not installed: pip install "
            "bitsandbytes (it needs a CUDA GPU)") in res.err
    assert len(res.err.strip().splitlines()) == 1


def test_text_from_the_command_line_converts_as_it_did_with_pydantic_and_true_is_not_a_number():
    # The conversions below are the ones the earlier pydantic models made (lax mode), kept for scripts.
    config = load_config(None, {"rank": "8.0", "resolution": " 64 ", "seed": "1_000", "random_flip": "yes",
                                "cache_latents": "off", "sample_prompts": ("a", "b"), "learning_rate": "2e-4"})
    assert (config.network.rank, config.data.resolution, config.training.seed) == (8, 64, 1000)
    assert config.data.random_flip is True and config.data.cache_latents is False
    assert config.sampling.sample_prompts == ["a", "b"] and config.training.learning_rate == 2e-4
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"rank": True, "learning_rate": True, "caption_extension": ".txt\n", "random_flip": "maybe",
                           "sample_prompts": ["a", 1], "crop": "Center", "model_name": ""})
    assert sorted(caught.value.problems) == sorted([
        "network.rank: input should be a valid integer (got true)",
        "training.learning_rate: input should be a valid number (got true)",
        "data.caption_extension: string should match pattern '^\\.\\w+$' (got \".txt\\n\")",
        "data.random_flip: input should be a valid boolean, unable to interpret input (got \"maybe\")",
        "sampling.sample_prompts.1: input should be a valid string (got 1)",
        "data.crop: input should be 'center' or 'random' (got \"Center\")",
        "model.model_name: string should have at least 1 character (got \"\")"])


def test_model_validate_and_model_dump_round_trip():
    config = load_config(None, {"rank": 4, "data_dir": "pics", "sample_prompts": ["a"]})
    dumped = config.model_dump()
    assert dumped["data"]["data_dir"] == Path("pics") and config.model_dump(mode="json")["data"]["data_dir"] == "pics"
    assert TrainConfig.model_validate(dumped) == config
    with pytest.raises(ConfigError, match="network: input should be a valid dictionary"):
        TrainConfig.model_validate({"network": 3})
