"""Bad inputs pinned by tests that live in other files, with the line a user sees for each.

docs/bad-inputs.md is generated from these and from tests marked `@pytest.mark.bad_input(category, case,
error)` (tests/gen_bad_inputs.py). An entry names the test that pins it by node id; the generator refuses
one whose file or function does not exist. `<...>` stands for what varies (a path, a port, a count).
"""

from __future__ import annotations

from typing import NamedTuple


class BadInput(NamedTuple):
    category: str  # config, data, model, runtime
    case: str
    error: str  # the line the user sees (stderr of `ftflow`, or the error a flow run ends with)
    node: str  # tests/<file>.py::<test>[<param id>]


E = "ftflow: error: "
CLI = "tests/flows/test_cli.py::"
CONFIG = "tests/configs/test_config.py::"
SOURCES = "tests/tasks/data/test_sources.py::"
FORMATS = "tests/tasks/data/test_formats.py::"
MODEL = "tests/tasks/train/test_model.py::"
PIPELINE = "tests/flows/test_pipeline.py::"
EXPORT = "tests/flows/test_export_serve.py::"

REGISTRY: list[BadInput] = [
    # --- config ----------------------------------------------------------------------------------------------
    BadInput(
        "config",
        "unknown key in an override",
        E + "<recipe> + overrides ['lora.rank=8']: unknown key 'lora.rank'",
        CLI + "test_config_error_is_one_line_and_exit_2",
    ),
    BadInput(
        "config",
        "unknown top-level key in a recipe",
        E + "<recipe>: unknown key 'epochs'",
        CONFIG + "test_unknown_top_level_key",
    ),
    BadInput(
        "config",
        "bad enum value (quantization.mode: 3bit, dpo.loss_type: kto)",
        E + "<recipe>: key 'quantization.mode': Input should be '4bit', '8bit' or 'none' (got '3bit')",
        CONFIG + "test_bad_value_names_key_and_file",
    ),
    BadInput(
        "config",
        "value out of range (lora.r=0)",
        E + "<recipe> + overrides ['lora.r=0']: key 'lora.r': Input should be greater than or equal to 1 (got 0)",
        CONFIG + "test_bad_override_value_names_key_and_overrides",
    ),
    BadInput(
        "config",
        "recipe that is not valid YAML",
        E + "<recipe>:3: not valid YAML (<what the parser expected>)",
        CONFIG + "test_invalid_yaml_names_file_and_line",
    ),
    BadInput(
        "config",
        "recipe that is a list, not a mapping",
        E + "<recipe>: expected a mapping at the top level, got list",
        CONFIG + "test_non_mapping_recipe_is_refused",
    ),
    BadInput(
        "config",
        "recipe name that does not exist",
        E + "<name>: recipe not found (expected a YAML file or one of: demo, demo-chat, ...)",
        CONFIG + "test_missing_recipe_names_the_shipped_ones",
    ),
    BadInput(
        "config",
        "override without '='",
        E + "command line: override 'lora.r' is not key.sub=value",
        CONFIG + "test_override_without_equals_fails_clearly",
    ),
    BadInput(
        "config",
        "override through a value (sft.max_steps.x=1)",
        E + "command line: override <key>: 'max_steps' is not a section",
        CONFIG + "test_override_through_a_scalar_fails_clearly",
    ),
    BadInput(
        "config",
        "disagreeing limits (quality.max_tokens > sft.max_length)",
        E + "<source>: quality.max_tokens (384) > sft.max_length (256): rows in between would be cut through their "
        "answer; lower quality.max_tokens, raise sft.max_length, or set sft.truncation=truncate_left",
        "tests/tasks/data/test_loss_mask.py::test_quality_max_tokens_above_the_training_window_fails_at_load_naming_both_keys",
    ),
    BadInput(
        "config",
        "unknown metric (eval.primary_metric=heldout_accuracy)",
        E + "<source>: key 'eval.primary_metric': unknown metric 'heldout_accuracy' (choices for eval.task=extraction: "
        "heldout_exact, ...)",
        "tests/tasks/evaluate/test_registry.py::test_unknown_primary_metric_is_a_config_error_naming_key_and_choices",
    ),
    BadInput(
        "config",
        "metric that does not apply to the task",
        E
        + "<source>: key 'eval.primary_metric': 'heldout_exact' does not apply to eval.task=free_text; choices: heldout_chrf, ...",
        "tests/tasks/evaluate/test_registry.py::test_metric_not_applicable_to_the_task_preset_is_a_config_error",
    ),
    BadInput(
        "config",
        "no data file and the demo data off",
        E + "<source>: data.sft_path is required when data.demo.enabled is false",
        CONFIG + "test_data_path_required_without_demo",
    ),
    BadInput(
        "config",
        "a secret in a bad override",
        E + "<recipe> + overrides ['...token=***']: unknown key 'lora.rank' (the value never echoed)",
        CONFIG + "test_config_error_echoes_overrides_redacted",
    ),
    BadInput(
        "config",
        "incomplete data.mapping",
        E + "<source>: key 'data.mapping': data.mapping needs `messages`, or `prompt` with ...",
        "tests/tasks/data/test_mapping.py::test_the_mapping_itself_is_validated_in_the_config",
    ),
    BadInput(
        "config",
        "unknown command-line option",
        "ftflow: error: unrecognized arguments: --no-such-option (usage first; exit 2)",
        CLI + "test_bad_usage_exits_2_with_the_reason",
    ),
    # --- data ------------------------------------------------------------------------------------------------
    BadInput(
        "data",
        "data file that does not exist",
        E + "<file>: file not found",
        PIPELINE + "test_missing_data_file_fails_clearly",
    ),
    BadInput(
        "data",
        "empty file (no bytes, blank lines, a CSV header, [])",
        E + "<file>: no rows",
        SOURCES + "test_empty_file",
    ),
    BadInput(
        "data",
        "latin-1 (or any non-UTF-8) bytes",
        E + "<file>:2: not UTF-8: byte 0xe9 at column <n> cannot be decoded; re-encode the file as UTF-8",
        SOURCES + "test_non_utf8_names_the_line_and_byte",
    ),
    BadInput("data", "UTF-8 with a byte-order mark", "(no error: the BOM is skipped)", SOURCES + "test_jsonl_with_bom"),
    BadInput(
        "data",
        "a truncated last line (an interrupted copy)",
        E + "<file>:2: not valid JSON (truncated?): <reason> (column <n>)",
        SOURCES + "test_truncated_last_line",
    ),
    BadInput(
        "data",
        "a broken line in the middle of a JSONL file",
        E + "<file>:3: not valid JSON: <reason> (column <n>)",
        PIPELINE + "test_malformed_jsonl_names_the_line",
    ),
    BadInput(
        "data",
        "a JSON array (or {data: [...]}) instead of JSON Lines",
        "(no error: read as rows)",
        SOURCES + "test_json_list_or_container",
    ),
    BadInput(
        "data",
        ".json holding one object or a number",
        E + "<file>: expected a list of rows, found an object with keys 'messages'",
        SOURCES + "test_json_that_is_not_a_list_of_rows",
    ),
    BadInput(
        "data",
        "a 10 MB line",
        E
        + "<file>:1: row of <n> bytes, more than max_row_bytes=1000000 (dropped to the quarantine when other rows remain)",
        SOURCES + "test_ten_megabyte_row",
    ),
    BadInput(
        "data",
        "Parquet bytes under a .jsonl/.csv/.json name",
        E + "<file>:1: not valid JSON ... / not UTF-8 ...",
        SOURCES + "test_parquet_bytes_under_another_name",
    ),
    BadInput(
        "data",
        "JSON Lines under a .parquet name",
        E + "<file>: cannot read as Parquet (<reason>)",
        SOURCES + "test_jsonl_under_a_parquet_name",
    ),
    BadInput(
        "data",
        "unsupported file suffix (.txt)",
        E + "<file>: unsupported file type; expected .jsonl, .json, .parquet, .csv or a saved dataset folder",
        SOURCES + "test_unsupported_suffix",
    ),
    BadInput(
        "data",
        "a folder that is not a saved HF dataset",
        E + "<folder>: not a dataset saved with save_to_disk ...",
        SOURCES + "test_directory_that_is_not_a_saved_dataset",
    ),
    BadInput(
        "data",
        "a DatasetDict without a 'train' split",
        E + "<folder>: splits a, b and no 'train' split ...",
        SOURCES + "test_hf_dataset_dict_uses_train_or_the_only_split",
    ),
    BadInput(
        "data",
        "rows of an unknown shape",
        E
        + "<file>:1: keys 'question', 'answer' match no format; expected alpaca (instruction/input/output), ... (or set data.mapping: <snippet>)",
        FORMATS + "test_unknown_shape_names_keys_and_expected_formats",
    ),
    BadInput(
        "data",
        "rows not in the format named by data.format",
        E + "<file>:1: ... alpaca ... missing key 'instruction' ...; the rows look like the openai format",
        FORMATS + "test_rows_not_in_the_named_format",
    ),
    BadInput(
        "data",
        "an SFT file given as preference pairs",
        E + "<file>: ... not preference pairs ...",
        FORMATS + "test_sft_file_read_as_preference",
    ),
    BadInput(
        "data",
        "unknown data.format name",
        E + "<file>: unknown format 'chatml' ...",
        FORMATS + "test_unsupported_format_name",
    ),
    BadInput(
        "data",
        "a field of the wrong type (content: null / 3 / [..]; role 'tool')",
        "(row dropped to the quarantine: '<file>:<line>: messages[1].content is null, expected a string')",
        FORMATS + "test_row_errors_name_the_field_and_what_was_expected",
    ),
    BadInput(
        "data",
        "a data.mapping path that matches nothing",
        E + "<file>: data.mapping.explode: path 'items' ... (keys found: ...)",
        "tests/tasks/data/test_mapping.py::test_a_bad_path_fails_the_file_once_naming_the_field_the_path_and_the_keys_found",
    ),
    BadInput(
        "data",
        "every row dropped by the quality checks",
        E + "<file>: no sft rows left after validation (<n> in; reasons: {...}); see <quarantine>",
        PIPELINE + "test_empty_after_filtering_fails",
    ),
    BadInput(
        "data",
        "held-out rows that also occur in train (overlapping splits)",
        E + "held-out set: <n> example(s) also occur in train ...",
        "tests/tasks/test_stages.py::test_heldout_overlapping_train_is_refused",
    ),
    BadInput(
        "data",
        "too few rows kept (a contract)",
        E
        + "data contract failed (sft): sft_rows.min_kept_rows (expect_table_row_count_to_be_between): observed <n> rows; expected >= <m>",
        "tests/flows/test_validate.py::test_failed_contract_stops_before_training",
    ),
    BadInput(
        "data",
        "`ftflow validate` of a file that fails its contract",
        "(report printed, 'contract FAILED', exit status 1)",
        "tests/flows/test_validate.py::test_cli_validate_exits_nonzero_when_a_contract_fails",
    ),
    # --- model -----------------------------------------------------------------------------------------------
    BadInput(
        "model",
        "a .bin-only (pickle) checkpoint",
        E + "model.name_or_path: <dir> has no model.safetensors (pickle checkpoints are refused) ...",
        MODEL + "test_pickle_only_checkpoint_is_refused",
    ),
    BadInput(
        "model",
        "a corrupted (cut-off) model.safetensors",
        E + "<dir>/model.safetensors: not a readable safetensors file (<reason>) ...",
        MODEL + "test_corrupt_safetensors_is_a_model_load_error_naming_the_file",
    ),
    BadInput(
        "model",
        "a corrupted config.json",
        E + "<dir>/config.json: ... not valid JSON ...",
        MODEL + "test_corrupt_config_json_is_a_model_load_error_naming_the_file",
    ),
    BadInput(
        "model",
        "a corrupted tokenizer.json",
        E + "<dir>/tokenizer.json: ... JSON ...",
        MODEL + "test_corrupt_tokenizer_json_is_a_model_load_error_naming_the_file",
    ),
    BadInput(
        "model",
        "weights missing from the model folder",
        E + "model.name_or_path: <dir> has no model.safetensors ...",
        MODEL + "test_missing_weights_are_a_model_load_error",
    ),
    BadInput(
        "model",
        "a model folder without config.json",
        E + "model.name_or_path: <dir> has no config.json ...",
        MODEL + "test_local_dir_without_config_is_refused",
    ),
    BadInput(
        "model",
        "a model path that does not exist",
        E + "model.name_or_path: path does not exist: <path>",
        PIPELINE + "test_missing_model_path_fails",
    ),
    BadInput(
        "model",
        "custom modelling code without trust_remote_code",
        E + "model.name_or_path: <dir> needs custom code ...; set model.trust_remote_code=true only if you trust it",
        MODEL + "test_custom_code_is_refused_by_default",
    ),
    BadInput(
        "model",
        "pkg:<package> that is not installed",
        E + "model.name_or_path: package '<name>' is not installed (pip install ...)",
        MODEL + "test_pkg_spec_for_missing_package_says_how_to_install",
    ),
    BadInput(
        "model",
        "4-bit quantization where bitsandbytes cannot load",
        E + "quantization.mode=4bit needs bitsandbytes ...",
        PIPELINE + "test_4bit_without_bitsandbytes_fails",
    ),
    # --- runtime ---------------------------------------------------------------------------------------------
    BadInput(
        "runtime",
        "dead tracking server",
        E
        + "MLflow tracking server http://bob:***@127.0.0.1:<port> is not reachable (connection refused): start it, or fix tracking.tracking_uri / MLFLOW_TRACKING_URI ...",
        CLI + "test_dead_tracking_server_fails_fast_in_one_redacted_line",
    ),
    BadInput(
        "runtime",
        "tracking server refusing the credentials",
        E + "MLflow store http://bob:***@127.0.0.1:<port>: <the server's refusal>",
        "tests/tasks/test_tracking.py::test_refused_credentials_fail_fast_in_one_redacted_line",
    ),
    BadInput(
        "runtime",
        "SQLite store in a folder that cannot be written",
        E + "MLflow store sqlite:///<path>: folder <dir> is not writable (Not a directory)",
        "tests/tasks/test_tracking.py::test_sqlite_store_in_an_unwritable_folder_fails_fast",
    ),
    BadInput(
        "runtime",
        "unreachable model registry",
        E + "registry.registry_uri: model registry at <uri> cannot be reached (<error>); nothing was registered",
        "tests/flows/test_gate.py::test_unreachable_registry_fails_and_registers_nothing",
    ),
    BadInput(
        "runtime",
        "export of an alias that does not exist",
        E + "models:/<name>@nosuch: ... has no alias 'nosuch'",
        EXPORT + "test_export_bad_inputs_fail_with_one_line[unknown alias]",
    ),
    BadInput(
        "runtime",
        "export into a folder that is not empty",
        E + "export directory is not empty: <dir>",
        EXPORT + "test_export_bad_inputs_fail_with_one_line[not empty]",
    ),
    BadInput(
        "runtime",
        "export --format gguf",
        E + "... supported formats are merged ...",
        EXPORT + "test_export_bad_inputs_fail_with_one_line[gguf]",
    ),
    BadInput(
        "runtime",
        "serve on a port in use",
        E + "port <port> on 127.0.0.1 is in use ...",
        EXPORT + "test_serve_bad_inputs_fail_with_one_line",
    ),
    BadInput(
        "runtime",
        "promote without --reason",
        E + "promote needs --reason ...",
        EXPORT + "test_promote_needs_a_reason_records_it_and_checks_the_template",
    ),
]
