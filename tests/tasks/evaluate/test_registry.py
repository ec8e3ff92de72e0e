"""The metric registry and the config checks it drives when a recipe loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftflow.configs.loader import ConfigError, flatten, load_config
from ftflow.tasks.evaluate import registry

REPO = Path(__file__).resolve().parents[3]


def test_every_preset_names_rankable_metrics_and_guards():
    for task, preset in registry.PRESETS.items():
        assert registry.check_primary(preset.primary, task) == preset.primary
        for guard in preset.guards:
            registry.check_guard(guard, task)
    assert registry.PRESETS["free_text"].primary == "heldout_chrf"


def test_unknown_primary_metric_is_a_config_error_naming_key_and_choices():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["eval.primary_metric=heldout_accuracy"])
    message = str(err.value)
    assert "key 'eval.primary_metric'" in message and "unknown metric 'heldout_accuracy'" in message
    assert "choices for eval.task=extraction: heldout_exact" in message


def test_metric_not_applicable_to_the_task_preset_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        load_config("demo-chat", ["eval.primary_metric=heldout_exact"])
    message = str(err.value)
    assert "key 'eval.primary_metric'" in message
    assert "'heldout_exact' does not apply to eval.task=free_text; choices: heldout_chrf" in message
    with pytest.raises(ConfigError, match="cannot rank runs"):
        load_config("demo", ["eval.primary_metric=heldout_perplexity"])  # no per-example form: rank on heldout_loss
    with pytest.raises(ConfigError, match="key 'eval.guards'"):
        load_config("demo", ["eval.guards=[eos_stop]"])


def test_task_preset_picks_primary_and_follows_the_demo_task():
    assert load_config("demo").eval.resolved_primary_metric == "heldout_exact"
    chat = load_config("demo", ["data.demo.task=free_text"])
    assert chat.eval.task.value == "free_text" and chat.eval.resolved_primary_metric == "heldout_chrf"
    # An explicit eval.task wins over the demo's.
    assert load_config("demo", ["data.demo.task=free_text", "eval.task=extraction"]).eval.task.value == "extraction"
    assert load_config("demo", ["eval.primary_metric=heldout_loss"]).eval.resolved_primary_metric == "heldout_loss"
    flat = flatten(load_config("demo-chat"))
    assert flat["eval.primary_metric"] == "heldout_chrf" and flat["eval.guards"] == [
        "eos_stop_rate",
        "preference_accuracy",
    ]


def test_free_text_tables_report_loss_not_exact_match():
    columns = registry.table_metrics("free_text", "heldout_chrf")
    assert columns[0] == "heldout_chrf" and "heldout_loss" in columns
    assert "heldout_exact" not in columns and "heldout_field_accuracy" not in columns


def test_aggregates():
    assert registry.aggregate(registry.get("heldout_exact"), [1, 0, 1, 1]) == 0.75
    assert registry.aggregate(registry.get("heldout_loss"), [1.0, 3.0], [3, 1]) == pytest.approx(1.5)
    out = registry.aggregate_all({"heldout_loss": [1.0, 3.0]}, {"heldout_loss": [3, 1]}, {"heldout_bleu": 0.2})
    assert out["heldout_perplexity"] == pytest.approx(2.718281828**1.5) and out["heldout_bleu"] == 0.2


def _metric_collections(source: str) -> list[list[str]]:
    """Every list, tuple, set or dict literal (its keys) that spells out two or more metric names."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        items = (
            node.keys
            if isinstance(node, ast.Dict)
            else node.elts
            if isinstance(node, (ast.List, ast.Tuple, ast.Set))
            else []
        )
        names = [i.value for i in items if isinstance(i, ast.Constant) and i.value in registry.BY_NAME]
        if len(names) >= 2:
            found.append(names)
    return found


def test_no_hand_written_metric_lists_outside_the_registry():
    """The registry is the one list: no evaluation, gate, sweep, stage or flow module keeps its own."""
    modules = [
        REPO / "tasks/stages.py",
        REPO / "tasks/registry/gate.py",
        *(REPO / "flows").glob("*.py"),
        *[p for p in (REPO / "tasks/evaluate").rglob("*.py") if p.name != "registry.py"],
    ]
    offenders = {
        str(p.relative_to(REPO)): found
        for p in modules
        if (found := _metric_collections(p.read_text(encoding="utf-8")))
    }
    assert not offenders, offenders
