"""Shared fixtures: offline hub, a private TUNELAB_HOME, the bundled tokenizer, tiny models."""

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TUNELAB_HOME", str(Path(__file__).resolve().parents[1] / ".tunelab-home"))
# train and eval register what they write: keep the tests' rows out of the shared $TUNELAB_HOME registry
os.environ.setdefault("TUNELAB_REGISTRY", str(Path(tempfile.mkdtemp(prefix="tunelab-registry-")) / "registry.sqlite"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from tunelab.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture()
def tiny_llama(tokenizer):
    from tunelab.models import tiny_model

    return tiny_model("llama", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as an HF folder (with the bundled tokenizer), usable as --model."""
    from tunelab.models import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def untied_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with its own output head (a tied one just repeats the prompt's last token)."""
    from tunelab.models import tiny_model

    folder = tmp_path_factory.mktemp("untied")
    model, tok = tiny_model("llama", tokenizer=tokenizer, tie_word_embeddings=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory):
    """A cross-encoder folder built from a config (random weights, fixed seed) with MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from tunelab.rag.embed import load_chunk_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cross-encoder")
    tok = load_chunk_tokenizer(None)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory):
    """A small chat-format JSONL training file: 64 rows of a learnable key: value extraction."""
    import json

    folder = tmp_path_factory.mktemp("data")
    path = folder / "train.jsonl"
    names = ["Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal"]
    with open(path, "w") as f:
        for i in range(64):
            n, q = names[i % 8], i % 7 + 1
            row = {"messages": [{"role": "user", "content": f"{n} wants {q} apples."},
                                {"role": "assistant", "content": json.dumps({"name": n, "qty": q})}]}
            f.write(json.dumps(row) + "\n")
    return path


def wait_for_health(proc, port: int, tries: int = 600) -> None:
    """Poll a `tunelab serve` process's /health on loopback until it answers 200; fail with its output if it
    exits first, or after `tries` polls."""
    import time

    import httpx2 as httpx

    for _ in range(tries):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "the server exited"
            time.sleep(0.1)
    raise AssertionError(f"tunelab serve on port {port} did not answer /health")


def single_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine it costs 2-3x."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def tunelab(monkeypatch, capsys):
    """Run `tunelab ARGS` in this process through the real entry point; returns (exit code, stdout, stderr)."""
    import sys

    from tunelab import cli

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["tunelab", *map(str, args)])
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


class Server:
    """A tunelab server (ServeService behind build_app, or any ASGI `app`) on a free loopback port, run by
    uvicorn in a thread; `client(key)` is the official openai SDK pointed at it."""

    def __init__(self, service, app=None):
        import socket
        import threading
        import time

        import uvicorn

        from tunelab.server import build_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.service = service
        self.server = uvicorn.Server(uvicorn.Config(app or build_app(service), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.service is not None:
            self.service.close()
