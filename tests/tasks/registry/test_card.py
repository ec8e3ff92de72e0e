"""The model card and the registry version description: pure functions of CardFacts."""

from __future__ import annotations

import pytest
import yaml

from ftflow.tasks.registry.card import CardFacts, build_card
from ftflow.tasks.registry.packaging import describe_version


def _facts(**over) -> CardFacts:
    facts = dict(
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        method="lora",
        stage="dpo",
        run_id="abc123",
        primary_metric="heldout_exact",
        model_name="ftflow-demo-adapter",
        version="3",
        aliases=["champion"],
        lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        quantization="4bit",
        datasets=[
            {"name": "sft", "digest": "d1g3st01", "context": "train", "rows": 540},
            {"name": "heldout", "digest": "h0ld0ut9", "context": "heldout", "rows": 60},
        ],
        validation={
            "sft": {
                "rows_in": 600.0,
                "rows_kept": 540.0,
                "rows_dropped": 60.0,
                "kept_ratio": 0.9,
                "contract_passed": 1.0,
                "reasons": {"exact_duplicate": 40.0, "empty_content": 20.0},
            }
        },
        heldout=[
            {"model": "base", "heldout_exact": 0.0, "eos_stop_rate": 0.9},
            {"model": "base_fewshot", "heldout_exact": 0.125},
            {"model": "dpo", "heldout_exact": 0.375, "eos_stop_rate": 1.0},
        ],
        few_shot_k=3,
        gate_summary="PROMOTE: heldout_exact 0.375 > base_fewshot 0.125",
        template_fingerprint="0123456789abcdef",
        run_url="http://127.0.0.1:5000/#/experiments/1/runs/abc123",
        languages=["en", "ja"],
        library_versions={"peft": "0.21.2"},
    )
    facts.update(over)
    return CardFacts(**facts)


def test_card_front_matter_is_hugging_face_layout():
    card = build_card(_facts())
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["library_name"] == "peft"
    assert {"ftflow", "lora", "dpo", "trl"} <= set(front["tags"])
    assert front["language"] == ["en", "ja"]
    assert "datasets" not in front  # local files, not Hub dataset ids
    # No registry.license in the recipe: the card claims none rather than inventing one.
    assert "license" not in front
    assert yaml.safe_load(build_card(_facts(license="apache-2.0")).split("---\n")[1])["license"] == "apache-2.0"


def test_card_body_carries_the_evidence():
    card = build_card(_facts())
    assert "# ftflow-demo-adapter v3" in card and "`@champion`" in card
    assert "r = 16, alpha = 32, dropout = 0.05" in card and "q_proj, v_proj" in card
    assert "| sft | train | 540 | `d1g3st01` |" in card
    # Validation figures, with drop reasons.
    assert "| sft | 600 | 540 | 60 | 0.900 | passed | empty_content 20, exact_duplicate 40 |" in card
    # Held-out table: the few-shot baseline beside the adapter, which is marked as this model.
    assert "| base, 3-shot prompt | 0.125 |" in card
    assert "| **DPO adapter (this model)** | 0.375 | 1.000 |" in card
    assert "PROMOTE: heldout_exact 0.375 > base_fewshot 0.125" in card
    for section in ("## Intended use", "## Limitations", "## Training data", "## Evaluation", "## Registry decision"):
        assert section in card
    assert "0123456789abcdef" in card


def test_card_without_registry_or_gate():
    card = build_card(_facts(model_name=None, version=None, aliases=[], gate_summary=None, heldout=[], datasets=[]))
    assert "# ftflow lora adapter" in card
    assert "did not go through the promotion gate" in card
    assert "No held-out metrics were logged" in card and "No data sets were logged" in card


def test_describe_version_names_decision_scores_digests_and_run():
    text = describe_version(_facts())
    assert "PROMOTE" in text
    assert "base 0.000, base_fewshot 0.125, dpo 0.375" in text
    assert "sft `d1g3st01`" in text and "heldout `h0ld0ut9`" in text
    assert "[abc123](http://127.0.0.1:5000/#/experiments/1/runs/abc123)" in text
    assert "r=16, alpha=32" in text


def test_card_license_intended_use_and_limits_come_from_the_recipe(tmp_path, monkeypatch):
    """The demo recipe's registry section, logged as the pipeline logs it, reaches the card through a real store,
    and the config's download leaves nothing behind in the temp folder (one card per promotion, export, serve)."""
    import tempfile

    from mlflow import MlflowClient

    from ftflow.configs.loader import load_config
    from ftflow.tasks.registry.card import CardSubject, gather_facts
    from ftflow.tasks.tracking import RESOLVED_CONFIG, redact_config_dict

    limit = "Answers only the demo's synthetic support questions."
    cfg = load_config("demo", [f"registry.limitations=[{limit!r}]", "registry.intended_use='Demo traffic only.'"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("card", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_dict(run_id, redact_config_dict(cfg.model_dump(mode="json")), RESOLVED_CONFIG)

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    facts = gather_facts(client, run_id, CardSubject(stage="sft"))
    assert list(scratch.iterdir()) == []
    card = build_card(facts)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == cfg.registry.license == "apache-2.0"
    assert "## License\n\n`apache-2.0`" in card
    assert "## Intended use\n\nDemo traffic only.\n" in card
    assert f"- {limit}\n" in card
    # The generic limits stay; the recipe's are added after them.
    assert card.index("inherits the base model's limits") < card.index(limit)


def test_card_license_must_be_an_id():
    from pydantic import ValidationError

    from ftflow.configs.schema import RegistryConfig

    with pytest.raises(ValidationError, match="license"):
        RegistryConfig(license="Apache License, Version 2.0")
