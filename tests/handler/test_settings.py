"""Flags and SM_LLM_* variables map to the same settings; bad ones fail naming themselves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from handler.settings import SettingsError, parse_settings


def test_environment_maps_to_flags_and_flags_win():
    env = {"SM_LLM_MAX_NUM_SEQS": "64", "SM_LLM_ENABLE_PREFIX_CACHING": "false",
           "SM_LLM_MODEL": "s3://bucket/model", "SAGEMAKER_BIND_TO_PORT": "9000",
           "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9999", "UNRELATED": "x"}
    server, engine = parse_settings(["--max-num-seqs", "8"], env)
    assert engine.max_num_seqs == 8
    assert engine.enable_prefix_caching is False
    assert engine.model == "s3://bucket/model" and engine.s3_endpoint == "http://127.0.0.1:9999"
    assert server.port == 9000 and server.served_model_name == "model"
    server, engine = parse_settings([], {})
    assert engine.model == "/opt/ml/model" and server.port == 8080
    assert parse_settings(["--model", "default"], {})[1].model == ""


def test_speculative_config_as_vllm_takes_it():
    flag = '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}'
    _, engine = parse_settings(["--speculative-config", flag], {})
    assert (engine.speculative.num_speculative_tokens, engine.speculative.prompt_lookup_max,
            engine.speculative.prompt_lookup_min) == (5, 4, 1)
    _, engine = parse_settings([], {"SM_LLM_SPECULATIVE_CONFIG": '{"max_num_seqs": 2}'})
    assert engine.speculative.max_num_seqs == 2
    assert parse_settings([], {})[1].speculative is None


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        ([], {"SM_LLM_MAX_NUM_SEQZ": "4"}, "SM_LLM_MAX_NUM_SEQZ"),
        ([], {"SM_LLM_ENABLE_PREFIX_CACHING": "maybe"}, "SM_LLM_ENABLE_PREFIX_CACHING"),
        ([], {"SM_LLM_MAX_NUM_SEQS": "many"}, "--max-num-seqs"),
        (["--block-size", "7"], {}, "block_size"),
        (["--port", "70000"], {}, "--port"),
        (["--bogus"], {}, "--bogus"),
        ([], {"SAGEMAKER_BIND_TO_PORT": "http"}, "SAGEMAKER_BIND_TO_PORT"),
        (["--speculative-config", '{"method": "eagle"}'], {}, "method"),
        (["--speculative-config", "ngram"], {}, "--speculative-config is not JSON"),
        (["--speculative-config", '{"num_speculative_tokens": "4"}'], {},
         "num_speculative_tokens"),
        ([], {"SM_LLM_SPECULATIVE_CONFIG": '{"k": 4}'}, r"unknown field\(s\) \['k'\]"),
    ],
)
def test_bad_settings_fail_naming_them(argv, env, named):
    with pytest.raises(SettingsError, match=named):
        parse_settings(argv, env)


def test_help_and_bad_flag_from_the_command_line():
    help_text = subprocess.run([sys.executable, "-m", "handler", "--help"], capture_output=True,
                               text=True, timeout=60)
    assert help_text.returncode == 0 and "--max-num-batched-tokens" in help_text.stdout
    assert "SM_LLM_" in help_text.stdout
    bad = subprocess.run([sys.executable, "-m", "handler"], capture_output=True, text=True,
                         timeout=60, env={"SM_LLM_NOPE": "1", "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "SM_LLM_NOPE" in bad.stderr
