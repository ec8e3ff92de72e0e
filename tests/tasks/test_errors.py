"""Errors raised by ftflow carry redacted text, so nothing that prints or stores them can leak a credential."""

from __future__ import annotations

import pickle

from ftflow.tasks.errors import ContractError, DataError, ModelLoadError, PipelineError

PASSWORD = "Pa55-w0rd-xyz"
URI = f"http://bob:{PASSWORD}@mlflow.internal:5000"


def test_pipeline_error_message_is_redacted():
    err = PipelineError(f"tracking server {URI} is not reachable")
    assert PASSWORD not in str(err)
    assert "http://bob:***@mlflow.internal:5000" in str(err)
    assert PASSWORD not in repr(err) and all(PASSWORD not in str(a) for a in err.args)


def test_every_subclass_redacts():
    for err in (
        DataError(f"cannot read {URI}/data.jsonl", path=f"{URI}/data.jsonl", line=3),
        ContractError(f"suite failed for {URI}"),
        ModelLoadError(f"hub_token=hf_{'x' * 30}"),
    ):
        assert PASSWORD not in str(err) and "x" * 30 not in str(err), str(err)


def test_secret_key_value_pairs_are_redacted_but_counts_are_not():
    err = PipelineError("override sft.extra.hub_token=abc123def failed; quality.max_tokens=512 is fine")
    assert "abc123def" not in str(err)
    assert "hub_token=***" in str(err) and "quality.max_tokens=512" in str(err)


def test_redacted_errors_survive_pickling():
    # Prefect persists task failures; the copy must still be the redacted one and must unpickle.
    err = pickle.loads(pickle.dumps(DataError(f"bad row from {URI}", path="x.jsonl", line=2)))
    assert isinstance(err, DataError) and PASSWORD not in str(err)
