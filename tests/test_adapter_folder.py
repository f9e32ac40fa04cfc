"""tunelab.runs.adapter_folder: the one reader of PEFT adapter folders, and adapter roots (`serve --adapters`)."""

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.runs import layout
from tunelab.runs.adapter_folder import AdapterRoot, read_adapter_folder


def adapter(folder, config=None, weights=True, run=None):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config or {"peft_type": "LORA", "r": 4}))
    if weights:
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if run is not None:
        (folder / "run.json").write_text(json.dumps(run))
    return folder


def test_an_adapter_folder_read_once_with_everything_callers_ask(tmp_path):
    run = {"base_model": {"spec": "tiny", "path": "/m/tiny", "hash": "abc"},
           "recipe": {"model": {"rope_scaling": {"type": "linear", "factor": 2.0}}}}
    a = read_adapter_folder(adapter(tmp_path / "a", {"peft_type": "LORA", "r": 4,
                                                     "base_model_name_or_path": "other"}, run=run))
    assert a.config["r"] == 4 and a.weights == tmp_path / "a" / "adapter_model.safetensors"
    assert a.base_model == "/m/tiny" and a.trained_on["hash"] == "abc"  # run.json wins over adapter_config
    assert a.rope_scaling == {"type": "linear", "factor": 2.0}
    assert a.weights_sha256 == layout.file_sha256(a.weights) and a.lora_config() is a.config
    a.check_rope({"rope_type": "linear", "factor": 2.0})
    with pytest.raises(TunelabError, match="trained with model.rope_scaling"):
        a.check_rope(None)
    a.check_base("tiny", lambda rec, spec: None)  # cannot tell: allowed
    with pytest.raises(TunelabError, match="was trained on 'tiny'.*--model tiny"):
        a.check_base("big", lambda rec, spec: False)
    plain = read_adapter_folder(adapter(tmp_path / "b", {"peft_type": "LORA", "base_model_name_or_path": "hub/x"}))
    assert plain.base_model == "hub/x" and plain.rope_scaling is None and plain.run is None


def test_what_is_not_an_adapter_folder_gets_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder, why in ((tmp_path / "empty", "no adapter_config.json"), (tmp_path / "nope", "it does not exist")):
        with pytest.raises(TunelabError, match=f"is not a PEFT adapter folder \\({why}\\); give the folder"):
            read_adapter_folder(folder)
    bad = adapter(tmp_path / "bad")
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(TunelabError, match="adapter_config.json is not valid JSON"):
        read_adapter_folder(bad)
    pickled = read_adapter_folder(adapter(tmp_path / "pickled", weights=False))
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(TunelabError, match="only adapter_model.bin: pickled weights are never loaded"):
        pickled.safetensors()
    prompt = read_adapter_folder(adapter(tmp_path / "prompt", {"peft_type": "PROMPT_TUNING", "token_dim": 8}))
    with pytest.raises(TunelabError, match="peft_type 'PROMPT_TUNING'; only LoRA adapters merge"):
        prompt.lora_config()
    with pytest.raises(TunelabError, match="expects hidden size 8, the base has 16"):
        prompt.check_hidden_size(16)


def test_an_adapter_root_says_what_it_serves_and_why_not_the_rest(tmp_path):
    root = tmp_path / "adapters"
    adapter(root / "acme-sql")
    adapter(root / "acme-support")
    adapter(root / "old-bot", weights=False)
    adapter(root / "has space")
    (root / "logs").mkdir()
    scan = AdapterRoot(root).scan()
    assert list(scan.found) == ["acme-sql", "acme-support"]
    assert "pickled weights are never loaded" in scan.refused["old-bot"]
    assert "rename the folder" in scan.refused["has space"] and "not an adapter folder" in scan.ignored["logs"]
    lines = scan.lines()
    assert lines[0] == f"2 adapter(s) in {root}: acme-sql, acme-support"
    assert any(x.startswith("  refused old-bot:") for x in lines) and any(x.startswith("  skipped logs:") for x in lines)
    assert AdapterRoot(root).folder("acme-sql") == root / "acme-sql"
    with pytest.raises(KeyError):
        AdapterRoot(root).folder("missing")


def test_an_adapter_folder_given_as_the_root_is_served_alone(tmp_path):
    one = adapter(tmp_path / "acme-sql")
    root = AdapterRoot(one)
    assert root.single and root.names() == ["acme-sql"] and root.folder("acme-sql") == one
    with pytest.raises(KeyError):
        root.folder("other")


def test_a_missing_or_empty_adapters_folder(tmp_path):
    for path, says in ((tmp_path / "missing", "does not exist"), (tmp_path / "f.txt", "is a file, not a folder")):
        if path.suffix:
            path.write_text("x")
        with pytest.raises(TunelabError, match=f"--adapters {path}: {says}"):
            AdapterRoot(path)
    (tmp_path / "empty").mkdir()
    assert AdapterRoot(tmp_path / "empty").scan().lines() == [
        f"no adapters in {tmp_path / 'empty'} (a subfolder with adapter_config.json and adapter_model.safetensors "
        "is one); only the base is served"]


def test_tunelab_serve_refuses_a_missing_adapters_folder_before_loading_the_model(tmp_path, tunelab):
    code, out, err = tunelab("serve", "--model", tmp_path / "no-model-here", "--adapters", tmp_path / "missing")
    assert code == 2 and "missing: does not exist" in err and "no-model-here" not in err


@pytest.mark.parametrize("fmt", ["vllm", "gguf-lora"])
def test_export_refuses_pickled_adapter_weights_with_the_fix(tmp_path, fmt):
    from tunelab.export import export

    folder = adapter(tmp_path / "old-bot", {"peft_type": "LORA", "r": 4, "base_model_name_or_path": "hub/none"},
                     weights=False)
    (folder / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(TunelabError, match="only adapter_model.bin: pickled weights are never loaded.*safe_serial"):
        export(str(folder), tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_a_pin_that_names_no_adapter_is_refused_with_what_there_is(tmp_path):
    from types import SimpleNamespace

    from tunelab.server import ServeService

    adapter(tmp_path / "adapters" / "acme-sql")
    with pytest.raises(TunelabError, match="--pin acme-sq: no adapter of that name.*it serves: acme-sql"):
        ServeService(SimpleNamespace(), "fake", tmp_path / "adapters", pinned=["acme-sq"], engine_thread=False)
