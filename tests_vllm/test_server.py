"""``vllm serve … --attention-backend CUSTOM`` on 127.0.0.1, driven by the ``openai`` client.

Sixteen concurrent completions of mixed lengths must return the text the offline engine gives
for the same prompts; malformed requests get vLLM's 4xx and the server keeps serving; SIGINT
stops it (and its engine process) cleanly.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest
from conftest import child_env
from workload import ENGINE, mixed_texts, vllm_and_custom

MAX_TOKENS = 8
START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_command() -> str:
    # The `vllm` script of this environment (.venv-vllm), not one found elsewhere on PATH.
    script = os.path.join(os.path.dirname(sys.executable), "vllm")
    return script if os.path.exists(script) else shutil.which("vllm") or "vllm"


@pytest.fixture
def server(model_dir, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    command = [
        _vllm_command(), "serve", model_dir("llama"),
        "--attention-backend", "CUSTOM",
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "tiny",
        "--dtype", "float32",
        "--max-model-len", "1024",
        "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]),
        "--enable-prefix-caching",
        "--kv-cache-memory-bytes", str(32 << 20),
        "--enforce-eager",
        "--seed", "0",
    ]  # fmt: skip
    env = child_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    # Its own session: the test can signal the server and find its engine process afterwards.
    proc = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{_tail(tmp_path)}")
            try:
                if [m.id for m in client.models.list()] == ["tiny"]:
                    break
            except openai.APIConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not start in time:\n{_tail(tmp_path)}")
            time.sleep(1)
        yield proc, client, tmp_path
    finally:
        # Only when the test did not stop it (it failed first): nothing of it may outlive it.
        if proc.poll() is None or _group(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _tail(tmp_path) -> str:
    return (tmp_path / "server.log").read_text()[-6000:]


def test_server_serves_custom_attention_like_the_offline_engine(server, model_dir, run_engines):
    proc, client, tmp_path = server
    # The offline engine's first 16 requests, as text (the tokenizer gives back their ids).
    prompts = mixed_texts()[:16]

    def complete(prompt: str) -> str:
        out = client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        served = list(pool.map(complete, prompts))

    _, offline = run_engines(model_dir("llama"), *vllm_and_custom())
    assert "error" not in offline, offline.get("traceback")
    for i, (want, have) in enumerate(zip(offline["texts"][:16], served, strict=True)):
        assert have == want, f"request {i}"
    # The engine process ran xyserve's backend: its metadata builder and its KV cache layout.
    log = (tmp_path / "server.log").read_text()
    assert "xyserve meta-attention (CUSTOM) serves 2 attention layers" in log, log[-6000:]
    assert "Using LBHNC KV cache layout" in log, log[-6000:]

    # Malformed requests: vLLM's 4xx, and the server keeps serving.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=prompts[3], max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=prompts[3], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="w5 " * 1100, max_tokens=4)
    assert complete(prompts[5]) == offline["texts"][5]

    # SIGINT: vLLM's front end shuts down, exits 0, and its engine and worker processes
    # follow within seconds; none of the server's process group is left.
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 0, _tail(tmp_path)
    deadline = time.monotonic() + 60
    while left := _group(proc.pid):
        assert time.monotonic() < deadline, f"server processes still running: {left}"
        time.sleep(0.5)


def _group(pgid: int) -> list[str]:
    """Processes of the process group ``pgid`` still running."""
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
    return out.stdout.split()
