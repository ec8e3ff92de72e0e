"""The registry model of `backend: openai`, logged as Models from Code: it answers through the fine-tuned
`ft:` model on the API. The model id and endpoint come from the model config; the key from the environment
variable named there, read at load time, so no key is ever stored with the model.
"""

from __future__ import annotations

import os

import mlflow
from mlflow.pyfunc import PythonModel


class OpenAIChatModel(PythonModel):
    """Input: prompts (a list of strings, or a frame: its `prompt` or first column); output: answers."""

    def load_context(self, context):
        from openai import OpenAI

        config = context.model_config
        self.model = config["fine_tuned_model"]
        self.max_tokens = int(config["max_new_tokens"])
        self.system_prompt = config.get("system_prompt")
        self.client = OpenAI(api_key=os.environ.get(config["key_env"], ""), base_url=config.get("base_url"))

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "columns"):
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = list(model_input[column])
        else:
            prompts = list(model_input)
        answers = []
        for prompt in prompts:
            messages = [{"role": "user", "content": str(prompt)}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            reply = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=0, max_tokens=self.max_tokens
            )
            answers.append(reply.choices[0].message.content or "")
        return answers


mlflow.models.set_model(OpenAIChatModel())
