"""Past the registry: export the champion as plain weights, serve it OpenAI-style, promote by hand.

One tiny pipeline run (module fixture) registers a version; every test reads from that store.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from ftflow.cli import main

# As in test_gate.py: the random tiny model ranks on held-out log-likelihood; SFT only, a few steps.
TRAIN = [
    "eval.primary_metric=heldout_logprob",
    "dpo.enabled=false",
    "sft.learning_rate=0.003",
    "sft.per_device_batch_size=8",
    "sft.save_steps=100",
    "sft.max_steps=6",
    "eval.max_examples=8",
]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert lines and lines[-1].startswith("ftflow: error: "), err[-3000:]
    assert sum(line.startswith("ftflow: error") for line in lines) == 1
    return lines[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registered(prefect_harness, tiny_model_dir, tmp_path_factory):
    from ftflow.configs.loader import load_config
    from ftflow.pipeline import pipeline_flow

    tmp = tmp_path_factory.mktemp("export-serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        store = [f"model.name_or_path={tiny_model_dir}", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"]
        cfg = load_config("tiny", [*store, f"output_dir={tmp / 'runs'}", *TRAIN])
        result = pipeline_flow(config=cfg)
        assert result["gate"]["alias"] == "champion", result["gate"]
        yield SimpleNamespace(
            cfg=cfg,
            tmp=tmp,
            run_id=result["run_id"],
            name=cfg.registry.model_name,
            cli=["--recipe", "tiny", *store],
            client=MlflowClient(cfg.tracking.tracking_uri),
            model_dir=tiny_model_dir,
        )


@pytest.fixture(scope="module")
def exported(registered):
    out = registered.tmp / "export-champion"
    assert main(["export", f"models:/{registered.name}@champion", "--to", str(out), *registered.cli]) == 0
    return out


def test_export_loads_with_plain_transformers_and_passes_the_check(registered, exported, capsys):
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
        "ftflow_export.json",
    ):
        assert (exported / name).exists(), name
    # No ftflow code on the loading side: a fresh interpreter, transformers only.
    script = (
        "import sys, json\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "text = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False, add_generation_prompt=True)\n"
        "ids = t(text, return_tensors='pt', add_special_tokens=False)\n"
        "out = m.generate(**ids, max_new_tokens=4)\n"
        "g = m.generation_config\n"
        "print(json.dumps({'ftflow': any(k.startswith('ftflow') for k in sys.modules), 'dtype': str(m.dtype),\n"
        "  'eos': g.eos_token_id, 'pad': g.pad_token_id, 'sample': g.do_sample, 'pad_token': t.pad_token,\n"
        "  'eot': t.convert_tokens_to_ids('<|im_end|>'), 'template': bool(t.chat_template), 'new': out.shape[1] - ids['input_ids'].shape[1]}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(exported)], capture_output=True, text=True, timeout=300, cwd=registered.tmp
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["ftflow"] is False and seen["dtype"] == "torch.float32" and seen["template"]
    assert seen["eos"] == seen["eot"] and seen["pad"] is not None and seen["pad_token"] and seen["sample"] is False
    assert 1 <= seen["new"] <= 4
    # The equivalence check ran, passed, and is on the source run.
    run = registered.client.get_run(registered.run_id)
    print(f"equivalence: {run.data.tags['export.equivalence']}")
    assert run.data.metrics["export/passed"] == 1.0
    assert run.data.metrics["export/agreement"] >= 0.95
    m = run.data.metrics
    assert m["export/primary_ci_low"] <= m["export/primary_merged"] <= m["export/primary_ci_high"]
    assert m["export/primary_delta"] == pytest.approx(m["export/primary_merged"] - m["export/primary_evaluated"])
    report = json.loads(
        Path(
            registered.client.download_artifacts(
                registered.run_id, "export/equivalence.json", str(registered.tmp / "eq")
            )
        ).read_text()
    )
    assert report["n_examples"] == 8 and len(report["examples"]) == 8
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert f"# {registered.name} v1" in card and "**SFT adapter (this model)**" in card


@pytest.mark.parametrize("case", ["unknown alias", "unknown model", "run without adapter", "not empty", "gguf"])
def test_export_bad_inputs_fail_with_one_line(registered, tmp_path, capsys, case):
    target = tmp_path / "out"
    spec = f"models:/{registered.name}@champion"
    extra: list[str] = []
    if case == "unknown alias":
        spec, expected = f"models:/{registered.name}@nosuch", "has no alias 'nosuch'"
    elif case == "unknown model":
        spec, expected = "models:/nosuch-model@champion", "no registered model named 'nosuch-model'"
    elif case == "run without adapter":
        client = registered.client
        experiment = client.get_run(registered.run_id).info.experiment_id
        spec, expected = client.create_run(experiment).info.run_id, "has no adapter"
    elif case == "not empty":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
        expected = "export directory is not empty"
    else:
        extra, expected = ["--format", "gguf"], "supported formats are merged"
    assert main(["export", spec, "--to", str(target), *extra, *registered.cli]) == 2
    assert expected in _one_error_line(capsys.readouterr().err)
    if case == "not empty":
        assert [p.name for p in target.iterdir()] == ["keep.txt"]
    else:
        assert not target.exists()


def test_export_refuses_a_merge_that_is_not_equivalent(registered, tmp_path, capsys, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    from ftflow.tasks.registry import export

    writer = export.EXPORTERS["lora"]

    def broken_merge(source, path, tokenizer, out, dtype, log):
        # A merge gone wrong (say, the wrong scaling): same files, different weights.
        writer(source, path, tokenizer, out, dtype, log)
        weights = load_file(out / "model.safetensors")
        torch.manual_seed(0)
        save_file(
            {k: v + 0.5 * torch.randn_like(v) for k, v in weights.items()},
            out / "model.safetensors",
            metadata={"format": "pt"},
        )

    # The tiny recipe trains on a 4-bit base (method qlora) or a plain one (lora): both take the LoRA merge.
    for method in ("lora", "qlora"):
        monkeypatch.setitem(export.EXPORTERS, method, broken_merge)
    target = tmp_path / "out"
    assert main(["export", registered.run_id, "--to", str(target), *registered.cli]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "not equivalent" in line
    assert not target.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert registered.client.get_run(registered.run_id).data.metrics["export/passed"] == 0.0


def test_logged_model_the_mlflow3_way(registered):
    import yaml

    from ftflow.tasks.registry.card import gather_facts
    from ftflow.tasks.registry.export import find_adapter, resolve_source
    from ftflow.tasks.registry.packaging import document_version, log_packaged_model, use_tracking_uri

    client, cfg = registered.client, registered.cfg
    source = resolve_source(client, f"models:/{registered.name}@champion")
    ref = log_packaged_model(cfg, source.adapter_dir, source.meta, registered.run_id, client)
    assert log_packaged_model(cfg, source.adapter_dir, source.meta, registered.run_id, client) == ref  # a retry
    model = client.get_logged_model(ref.model_id)
    run = client.get_run(registered.run_id)
    assert model.experiment_id == run.info.experiment_id and model.source_run_id == registered.run_id
    assert "READY" in str(model.status)
    assert source.method in ("lora", "qlora")
    assert model.model_type == f"{source.method}-adapter" and model.tags["ftflow.method"] == source.method
    linked = {m.key: m for m in model.metrics or []}
    assert "eval/heldout_logprob" in linked and linked["eval/heldout_logprob"].model_id == ref.model_id
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert ref.model_id in [o.model_id for o in client.get_run(registered.run_id).outputs.model_outputs]
    import mlflow.artifacts

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=model.artifact_location,
            dst_path=str(registered.tmp / "lm"),
            tracking_uri=cfg.tracking.tracking_uri,
        )
    )
    spec = yaml.safe_load((local / "MLmodel").read_text())
    assert spec["signature"]["inputs"] and spec["saved_input_example_info"]
    assert spec["flavors"]["python_function"]["model_code_path"].endswith("pyfunc_model.py")
    pins = (local / "requirements.txt").read_text().split()
    import transformers

    assert f"transformers=={transformers.__version__}" in pins and any(p.startswith("peft==") for p in pins)
    # It loads and answers through pyfunc, plain list in, as the signature says.
    import mlflow.pyfunc

    with use_tracking_uri(cfg.tracking.tracking_uri):
        answers = mlflow.pyfunc.load_model(ref.model_uri).predict(["Extract the order as JSON:\nKen ordered 3 lamps."])
    assert len(answers) == 1 and isinstance(answers[0], str)
    # A version registered from the LoggedModel finds its adapter there; its description tells the story.
    mv = client.create_model_version(
        registered.name, source=ref.model_uri, run_id=registered.run_id, model_id=ref.model_id
    )
    assert find_adapter(client, registered.run_id, mv)
    card = document_version(client, registered.name, mv.version, registered.run_id, stage="sft")
    text = client.get_model_version(registered.name, mv.version).description
    assert "PROMOTE" in text and "heldout_logprob" in text and registered.run_id in text
    digests = [d["digest"] for d in gather_facts(client, registered.run_id).datasets if d["name"] == "sft"]
    assert digests and digests[0] in text and digests[0] in card
    logged_card = client.download_artifacts(registered.run_id, "model_card/README.md", str(registered.tmp / "card"))
    assert Path(logged_card).read_text() == card


@pytest.mark.slow
def test_serve_answers_like_generate(registered, exported):
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftflow.configs.schema import EvalConfig
    from ftflow.tasks.evaluate.evaluation import generate

    port = _free_port()
    log = (registered.tmp / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftflow.cli", "serve", str(exported), "--port", str(port), *registered.cli],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=registered.tmp,
    )
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError((registered.tmp / "serve.log").read_text()[-4000:]) from None
                time.sleep(1)
        messages = [{"role": "user", "content": "Extract the order as JSON:\nKen ordered 3 lamps in Osaka."}]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed")
        reply = client.chat.completions.create(
            model=str(exported), messages=messages, temperature=0, max_tokens=registered.cfg.eval.max_new_tokens
        )
        served = reply.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ours = generate(
        model,
        tokenizer,
        [messages],
        EvalConfig(max_new_tokens=registered.cfg.eval.max_new_tokens, batch_size=1),
        "<|im_end|>",
    )[0]
    assert served == ours["answer"]
    assert served  # the tiny model says something, if nothing useful


def test_serve_bad_inputs_fail_with_one_line(registered, exported, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", str(exported), "--port", str(port), *registered.cli]) == 2
        assert "is in use" in _one_error_line(capsys.readouterr().err)
    # The folder's chat template is not the one the adapter was trained under.
    edited = tmp_path / "edited"
    shutil.copytree(exported, edited)
    template = edited / "chat_template.jinja"
    template.write_text(template.read_text() + "{# edited #}")
    assert main(["serve", str(edited), "--port", str(_free_port()), *registered.cli]) == 2
    assert "chat template fingerprint" in _one_error_line(capsys.readouterr().err)
    # A folder ftflow did not export has no recorded fingerprint to check against.
    assert main(["serve", registered.model_dir, "--port", str(_free_port()), *registered.cli]) == 2
    assert "ftflow_export.json" in _one_error_line(capsys.readouterr().err)


def test_promote_needs_a_reason_records_it_and_checks_the_template(registered, tmp_path, capsys):
    client, name = registered.client, registered.name
    second = client.create_model_version(
        name, source=f"runs:/{registered.run_id}/registry_model", run_id=registered.run_id
    ).version
    try:
        assert main(["promote", name, str(second), *registered.cli]) == 2
        assert "needs --reason" in _one_error_line(capsys.readouterr().err)
        assert main(["promote", name, "999", "--reason", "x", *registered.cli]) == 2
        assert "has no version 999" in _one_error_line(capsys.readouterr().err)
        # A base model whose tokenizer template changed: the version's fingerprint no longer matches.
        changed = tmp_path / "changed-base"
        shutil.copytree(registered.model_dir, changed)
        (changed / "chat_template.jinja").write_text((changed / "chat_template.jinja").read_text() + "{# v2 #}")
        cli = [a.replace(registered.model_dir, str(changed)) for a in registered.cli]
        assert main(["promote", name, str(second), "--reason", "rollback", *cli]) == 2
        assert "chat template" in _one_error_line(capsys.readouterr().err)
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

        assert (
            main(
                [
                    "promote",
                    name,
                    str(second),
                    "--reason",
                    "reviewed by hand: better on Japanese orders",
                    *registered.cli,
                ]
            )
            == 0
        )
        assert str(client.get_model_version_by_alias(name, "champion").version) == str(second)
        record = json.loads(client.get_model_version(name, str(second)).tags["ftflow.manual_promotion"])
        assert record["reason"] == "reviewed by hand: better on Japanese orders" and record["previous"] == "1"
    finally:
        client.set_registered_model_alias(name, "champion", "1")
