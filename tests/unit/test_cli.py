"""The debug CLIs users of other runtimes rely on: exact prompt text and stdin parsing."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

import pytest

from rexomni_server.cli import main, run_event_loop
from rexomni_server.runtime import Runtime
from rexomni_server.settings import Settings


def test_prompt_prints_the_exact_task_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prompt", "--task", "gui_grounding", "--categories", "search bar"]) == 0
    assert capsys.readouterr().out == 'Detect element "search bar"" in the image.\n'


def test_prompt_visual_prompt_needs_and_uses_the_image_size(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["prompt", "--task", "visual_prompting", "--visual-prompt-boxes", "[[0, 0, 50, 50]]"]
    assert main([*args, "--width", "100", "--height", "100"]) == 0
    assert '{"object_1": ["<0><0><499><499>"]}' in capsys.readouterr().out
    assert main(args) == 2
    assert "image size" in capsys.readouterr().err


def test_parse_reads_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    raw = "<|object_ref_start|>cup<|object_ref_end|><|box_start|><999><0>, <0><99"
    monkeypatch.setattr("sys.stdin", io.StringIO(raw))
    assert main(["parse", "--task", "pointing", "--width", "200", "--height", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["detections"] == [{"label": "cup", "type": "point", "point": [200.0, 0.0], "score": None}]
    assert out["truncated"] is True


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prompt", "--task", "keypoint", "--categories", "cat"]) == 2
    assert "keypoint_type" in capsys.readouterr().err


def test_serve_flags_become_settings() -> None:
    from rexomni_server.cli import _settings_overrides, build_parser
    from rexomni_server.settings import Settings

    args = build_parser().parse_args(["serve", "--model", "m", "--port", "9000", "--grpc-port", "9001", "--no-grpc"])
    settings = Settings(**_settings_overrides(args))
    assert (settings.model, settings.port, settings.grpc_port) == ("m", 9000, 9001)
    assert settings.http_enabled and not settings.grpc_enabled
    both_off = build_parser().parse_args(["serve", "--no-grpc", "--no-http"])
    with pytest.raises(ValueError, match="at least one"):
        Settings(**_settings_overrides(both_off))
    # Every setting has a flag (but the secret keys), validated like its environment variable.
    flags = ["serve", "--max-queue", "10", "--gpu-memory-utilization", "0.8", "--enforce-eager"]
    settings = Settings(**_settings_overrides(build_parser().parse_args(flags)))
    assert (settings.max_queue, settings.gpu_memory_utilization, settings.enforce_eager) == (10, 0.8, True)
    with pytest.raises(ValueError, match="max_queue"):
        Settings(**_settings_overrides(build_parser().parse_args(["serve", "--max-queue", "many"])))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--api-keys", "k"])  # would show in ps
    # A flag left out leaves the environment's value.
    assert _settings_overrides(build_parser().parse_args(["serve"])) == {}


def test_misspelt_environment_settings_stop_the_server_before_it_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rexomni_server.settings import unknown_env_settings

    env = {"REXOMNI_GPU_MEMORY_UTILISATION": "0.5", "rexomni_port": "1", "REXOMNI_XYZZY": "1", "HOME": "/"}
    assert unknown_env_settings(env) == [
        "REXOMNI_GPU_MEMORY_UTILISATION (did you mean REXOMNI_GPU_MEMORY_UTILIZATION?)",
        "REXOMNI_XYZZY",
    ]
    assert unknown_env_settings({"REXOMNI_API_KEY": "k", "REXOMNI_URL": "u"}) == []  # the client's own
    monkeypatch.setenv("REXOMNI_MAX_NEW_TOKEN", "100")
    assert main(["serve", "--model", "tiny"]) == 2  # refused before any engine or port is touched
    assert "REXOMNI_MAX_NEW_TOKEN (did you mean REXOMNI_MAX_NEW_TOKENS?)" in capsys.readouterr().err


def test_the_clients_api_key_variable_alone_does_not_start_an_open_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REXOMNI_API_KEY", "s3cret")
    assert main(["serve", "--model", "tiny"]) == 2
    assert "REXOMNI_API_KEYS" in capsys.readouterr().err


def test_an_api_keys_file_that_cannot_be_read_stops_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "tiny", "--api-keys-file", str(tmp_path / "missing")]) == 2
    assert "api_keys_file" in capsys.readouterr().err


def test_auto_engine_falls_back_to_transformers_without_vllm() -> None:
    import importlib.util

    from rexomni_server.runtime import choose_engine_name
    from rexomni_server.settings import Settings

    expected = "transformers" if importlib.util.find_spec("vllm") is None else "vllm"
    assert choose_engine_name(Settings(engine="auto")) == expected
    assert choose_engine_name(Settings(engine="scripted")) == "scripted"


def test_make_tiny_model_writes_a_loadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert main(["make-tiny-model", str(tmp_path / "tiny")]) == 0
    assert "RANDOM-WEIGHT" in capsys.readouterr().out
    config = AutoConfig.from_pretrained(tmp_path / "tiny")
    assert config.model_type == "qwen2_5_vl"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    assert tokenizer.convert_tokens_to_ids("<999>") != tokenizer.unk_token_id  # the coordinate tokens


def test_serve_runs_on_uvloop() -> None:
    async def on_uvloop() -> int:
        return int(type(asyncio.get_running_loop()).__module__.startswith("uvloop"))

    assert run_event_loop(on_uvloop()) == 1


def test_make_tiny_model_without_the_model_packages_prints_a_hint_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("tokenizers", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` of it raises ModuleNotFoundError
    assert main(["make-tiny-model", str(tmp_path / "tiny")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'rexomni[transformers]'" in err and "Traceback" not in err


def test_the_tiny_checkpoint_by_its_path_is_labelled_random_weights(tmp_path: Path) -> None:
    assert main(["make-tiny-model", str(tmp_path / "tiny")]) == 0
    by_path = Runtime(Settings(model=str(tmp_path / "tiny"), engine="transformers"))
    assert by_path.random_weights and "RANDOM WEIGHTS" in by_path.service.model_label
    real_name = Runtime(Settings(model="IDEA-Research/Rex-Omni", engine="transformers"))
    assert not real_name.random_weights and real_name.service.model_label == "IDEA-Research/Rex-Omni"
