"""The config tree: shipped recipes validate, errors name key and file, overrides parse, the schema drives the form."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftflow.configs.loader import RECIPES_DIR, ConfigError, apply_overrides, flatten, load_config
from ftflow.configs.schema import DPOLoss, PipelineConfig, Quantization

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- shipped recipes -------------------------------------------------------------------------


def test_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"demo", "tiny"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads_and_validates(recipe):
    by_path = load_config(recipe)
    by_name = load_config(recipe.stem)
    assert isinstance(by_path, PipelineConfig)
    assert by_path == by_name
    # A recipe round-trips through its own dump, so what MLflow logs can be loaded back.
    assert PipelineConfig.model_validate(by_path.model_dump(mode="json")) == by_path


def test_missing_recipe_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="recipe not found") as err:
        load_config("no-such-recipe")
    assert "demo" in str(err.value) and "tiny" in str(err.value)


# --- errors name the key and the file --------------------------------------------------------


def test_unknown_key_names_dotted_key_and_file(tmp_path):
    path = write_recipe(tmp_path, "lora:\n  r: 8\n  rank: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "unknown key 'lora.rank'" in message
    assert str(path) in message


def test_known_keys_in_same_section_load(tmp_path):
    path = write_recipe(tmp_path, "lora:\n  r: 8\n  dropout: 0.1\n")
    cfg = load_config(path)
    assert (cfg.lora.r, cfg.lora.dropout) == (8, 0.1)


def test_unknown_top_level_key(tmp_path):
    path = write_recipe(tmp_path, "epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'epochs'"):
        load_config(path)


@pytest.mark.parametrize(
    "text, key",
    [
        ("quantization:\n  mode: 3bit\n", "quantization.mode"),
        ("lora:\n  r: 0\n", "lora.r"),
        ("dpo:\n  loss_type: kto\n", "dpo.loss_type"),
        ("sft:\n  learning_rate: -1\n", "sft.learning_rate"),
    ],
)
def test_bad_value_names_key_and_file(tmp_path, text, key):
    path = write_recipe(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"key '{key}'" in message
    assert str(path) in message


def test_good_values_for_the_same_keys(tmp_path):
    path = write_recipe(tmp_path, "quantization:\n  mode: 8bit\nlora:\n  r: 1\ndpo:\n  loss_type: ipo\n")
    cfg = load_config(path)
    assert cfg.quantization.mode is Quantization.eight_bit
    assert cfg.lora.r == 1
    assert cfg.dpo.loss_type is DPOLoss.ipo


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write_recipe(tmp_path, "lora:\n  r: 8\n  alpha: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_non_mapping_recipe_is_refused(tmp_path):
    path = write_recipe(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_bad_override_value_names_key_and_overrides():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["lora.r=0"])
    message = str(err.value)
    assert "key 'lora.r'" in message
    assert "tiny.yaml" in message and "overrides" in message


def test_data_path_required_without_demo():
    with pytest.raises(ConfigError, match="data.sft_path is required"):
        load_config(None, ["data.demo.enabled=false"])
    cfg = load_config(None, ["data.demo.enabled=false", "data.sft_path=train.jsonl"])
    assert cfg.data.sft_path == "train.jsonl"


# --- LoRA alpha --------------------------------------------------------------------------------


def test_alpha_defaults_to_twice_r():
    cfg = load_config(None, ["lora.r=8"])
    assert cfg.lora.alpha is None
    assert cfg.lora.resolved_alpha == 16


def test_explicit_alpha_wins():
    cfg = load_config(None, ["lora.r=8", "lora.alpha=7"])
    assert cfg.lora.resolved_alpha == 7


# --- overrides -----------------------------------------------------------------------------------


def test_overrides_parse_scalars_and_lists():
    raw = apply_overrides(
        {},
        [
            "sft.max_steps=12",
            "sft.learning_rate=0.001",
            "dpo.enabled=false",
            "quality.languages=[en, fr]",
            "data.system_prompt=Answer in JSON.",
            "tracking.run_name=null",
            "model.name_or_path=/a=b/c",
        ],
    )
    assert raw["sft"] == {"max_steps": 12, "learning_rate": 0.001}
    assert raw["dpo"] == {"enabled": False}
    assert raw["quality"] == {"languages": ["en", "fr"]}
    assert raw["data"] == {"system_prompt": "Answer in JSON."}
    assert raw["tracking"] == {"run_name": None}
    # Only the first '=' splits key from value.
    assert raw["model"] == {"name_or_path": "/a=b/c"}


def test_overrides_do_not_mutate_the_recipe_dict():
    raw = {"lora": {"r": 8}}
    out = apply_overrides(raw, ["lora.r=32"])
    assert raw == {"lora": {"r": 8}}
    assert out == {"lora": {"r": 32}}


def test_overrides_reach_the_validated_config():
    cfg = load_config("tiny", ["lora.r=32", "sft.learning_rate=5e-3", "dpo.loss_type=hinge", "sweep.ranks=[4, 8]"])
    assert cfg.lora.r == 32
    assert cfg.sft.learning_rate == pytest.approx(5e-3)
    assert cfg.dpo.loss_type is DPOLoss.hinge
    assert cfg.sweep.ranks == [4, 8]
    # Keys the override does not touch keep the recipe's values.
    assert cfg.sft.max_steps == 2


def test_exponent_floats_parse_as_floats_in_extra():
    cfg = load_config(None, ["sft.extra.weight_decay=1e-2"])
    assert cfg.sft.extra["weight_decay"] == pytest.approx(0.01)


def test_override_through_a_scalar_fails_clearly():
    # Through a scalar the recipe sets: refused while applying the override.
    with pytest.raises(ConfigError, match=r"'max_steps' is not a section"):
        load_config("tiny", ["sft.max_steps.x=1"])
    # Through a scalar only the defaults set: refused by validation, still naming the key.
    with pytest.raises(ConfigError, match=r"key 'lora.r'"):
        load_config(None, ["lora.r.x=1"])
    with pytest.raises(ConfigError, match=r"'seed' is not a section"):
        apply_overrides({"seed": 1}, ["seed.value=2"])


def test_override_without_equals_fails_clearly():
    with pytest.raises(ConfigError, match=r"not key.sub=value"):
        load_config(None, ["lora.r"])


def test_override_of_unknown_key_is_refused():
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rank'"):
        load_config(None, ["lora.rank=8"])


# --- flatten -----------------------------------------------------------------------------------


def test_flatten_gives_dotted_keys_with_resolved_alpha():
    flat = flatten(load_config(None, ["lora.r=8"]))
    assert flat["lora.r"] == 8
    assert flat["lora.alpha"] == 16
    assert flat["dpo.beta"] == 0.1
    assert flat["data.demo.seed"] == 0
    assert flat["quantization.mode"] == "4bit"
    assert not any(isinstance(v, dict) and v for v in flat.values())


def test_flatten_keeps_explicit_alpha():
    assert flatten(load_config(None, ["lora.r=8", "lora.alpha=3"]))["lora.alpha"] == 3


# --- the JSON schema behind the Prefect form -----------------------------------------------------


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref") or next(
        (n["$ref"] for n in node.get("allOf", []) + node.get("anyOf", []) if "$ref" in n), None
    )
    return schema["$defs"][ref.split("/")[-1]] if ref else node


def test_schema_describes_every_field_of_every_section():
    schema = PipelineConfig.model_json_schema()
    missing = []
    sections = []
    for name, prop in schema["properties"].items():
        if not prop.get("description"):
            missing.append(name)
        target = _resolve(schema, prop)
        if target.get("type") == "object" and "properties" in target:
            sections.append(name)
            for field, sub in target["properties"].items():
                if not sub.get("description"):
                    missing.append(f"{name}.{field}")
                nested = _resolve(schema, sub)
                for leaf, leaf_prop in nested.get("properties", {}).items():
                    if not leaf_prop.get("description"):
                        missing.append(f"{name}.{field}.{leaf}")
    assert missing == []
    assert set(sections) >= {
        "model",
        "quantization",
        "lora",
        "data",
        "quality",
        "sft",
        "dpo",
        "eval",
        "tracking",
        "registry",
        "sweep",
    }


def test_schema_has_enums_for_quantization_mode_and_dpo_loss():
    schema = PipelineConfig.model_json_schema()
    quant = _resolve(schema, schema["properties"]["quantization"])
    dpo = _resolve(schema, schema["properties"]["dpo"])
    mode = _resolve(schema, quant["properties"]["mode"])
    loss = _resolve(schema, dpo["properties"]["loss_type"])
    assert set(mode["enum"]) == {"4bit", "8bit", "none"}
    assert set(loss["enum"]) == {"sigmoid", "hinge", "ipo"}
    assert quant["properties"]["mode"]["default"] == "4bit"
    # A free-form field has no enum: the form shows a text box there.
    assert "enum" not in _resolve(schema, schema["properties"]["output_dir"])


# --- secrets in overrides never reach an error message ----------------------------------------


@pytest.mark.parametrize(
    "override, secret",
    [
        ("tracking.tracking_uri=http://bob:Pa55w0rdXYZ@mlflow.internal:5000", "Pa55w0rdXYZ"),
        ("sft.extra.hub_token=abc123def456", "abc123def456"),
        ("dpo.extra.api_key=k3yk3yk3y", "k3yk3yk3y"),
    ],
)
def test_config_error_echoes_overrides_redacted(override, secret):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override, "lora.rank=8"])
    assert "unknown key 'lora.rank'" in str(err.value)
    assert secret not in str(err.value), str(err.value)
    assert "***" in str(err.value)


def test_bad_value_of_a_secret_key_is_not_echoed():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["tracking.tracking_uri=[http://bob:Pa55w0rdXYZ@h]"])
    assert "tracking.tracking_uri" in str(err.value) and "Pa55w0rdXYZ" not in str(err.value)


def test_model_cache_dir_defaults_to_the_user_cache_not_the_working_directory():
    assert PipelineConfig().model.cache_dir is None
    assert all(load_config(p).model.cache_dir is None for p in ("demo", "tiny", "production"))
