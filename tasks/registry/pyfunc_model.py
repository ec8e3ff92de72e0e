"""The packaged adapter's inference code, logged the MLflow 3 way: Models from Code.

`packaging.py` hands MLflow this file's path, not an object: MLflow copies the file into the model
and runs it at load time, so nothing is cloudpickled (a pickled class breaks when the code around it
moves, and unpickling runs arbitrary code). The file needs the `ftflow` package installed where the
model loads; the adapter, the resolved config and the template fingerprint come from the model.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class LoraAdapterModel(PythonModel):
    """Base model + adapter; input: prompts (a list of strings, or a frame: its `prompt` or first column); output: answers."""

    def load_context(self, context):
        from peft import PeftModel

        from ftflow.tasks.evaluate.evaluation import check_template
        from ftflow.tasks.registry.packaging import RunSettings, adapter_method
        from ftflow.tasks.train.model import load_base_model, load_tokenizer, offline_env, resolve_model_path

        offline_env()
        # Section by section: a model packaged under an older config schema still loads.
        cfg = RunSettings.from_config_dict(context.model_config["pipeline_config"])
        path = resolve_model_path(cfg.model)
        self.tokenizer = load_tokenizer(path, cfg.model)
        adapter = context.artifacts["adapter"]
        # The template the adapter was trained under must be the one serving it.
        check_template(adapter, context.model_config["template_fingerprint"], self.tokenizer)
        if adapter_method(adapter) == "full":
            # A full fine-tune is the whole model, packaged where an adapter would be.
            self.model = load_base_model(adapter, cfg.model, cfg.quantization)
        else:
            self.model = PeftModel.from_pretrained(load_base_model(path, cfg.model, cfg.quantization), adapter)
        self.model.eval()
        self.cfg = cfg
        self.eos = context.model_config["eos_token"]

    def predict(self, context, model_input, params=None):
        from ftflow.tasks.data.formatting import with_system_prompt
        from ftflow.tasks.evaluate.evaluation import generate

        if hasattr(model_input, "columns"):
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = list(model_input[column])
        else:
            prompts = list(model_input)
        messages = [with_system_prompt([{"role": "user", "content": str(p)}], self.cfg.system_prompt) for p in prompts]
        return [g["answer"] for g in generate(self.model, self.tokenizer, messages, self.cfg.eval, self.eos)]


mlflow.models.set_model(LoraAdapterModel())
