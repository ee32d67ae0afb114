"""Contract tests of Ollama's documented API, run against the session's server.

They pass against the llama.cpp test server (``tests/ollama_server.py``) and are meant to pass
against a real Ollama too: ``OLLAMA_HOST=http://127.0.0.1:11434 pytest tests/test_ollama_server.py``
runs them there, which is how the test server is kept honest. Tests of the test-only endpoints,
and of checks the test server makes more strictly than Ollama, ask for ``ollama_test_server``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailrouter.config import default_departments
from mailrouter.prompt import build_prompt, render_chat
from tests.fixtures.ollama import OllamaEndpoint, publish_gguf

PROMPT = render_chat(
    build_prompt(
        "Bonjour, je voudrais un devis pour 20 licences et connaitre vos tarifs.",
        default_departments(),
        subject="Demande de devis",
        sender_domain="client.fr",
    )
)


def generate(server: OllamaEndpoint, model: str, **body: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT, "raw": True, "stream": False, **body}
    resp = server.post("/api/generate", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def greedy(num_predict: int = 6, **options: Any) -> dict[str, Any]:
    return {"temperature": 0, "num_predict": num_predict, **options}


# --- no model needed -------------------------------------------------------------------------


def test_version_and_tags(ollama_server: OllamaEndpoint) -> None:
    version = ollama_server.get("/api/version").json()["version"]
    assert isinstance(version, str) and version
    assert isinstance(ollama_server.get("/api/tags").json()["models"], list)


def test_blob_digest_is_checked(ollama_server: OllamaEndpoint) -> None:
    data = os.urandom(1000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    url = f"{ollama_server.url}/api/blobs/{digest}"
    assert httpx.head(url).status_code == 404
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    refused = httpx.post(f"{ollama_server.url}/api/blobs/{wrong}", content=data)
    assert refused.status_code == 400
    assert "error" in refused.json()
    assert httpx.head(f"{ollama_server.url}/api/blobs/{wrong}").status_code == 404
    assert httpx.post(url, content=data).status_code == 201
    assert httpx.head(url).status_code == 200


def test_unknown_model_is_a_404_naming_it(ollama_server: OllamaEndpoint) -> None:
    name = "mailrouter-no-such-model"
    for method, path, body in [
        ("POST", "/api/generate", {"model": name, "prompt": "x", "stream": False}),
        ("POST", "/api/show", {"model": name}),
        ("DELETE", "/api/delete", {"model": name}),
        ("POST", "/api/copy", {"source": name, "destination": name + "-copy"}),
    ]:
        resp = httpx.request(method, ollama_server.url + path, json=body, timeout=30)
        assert resp.status_code == 404, (path, resp.text)
        assert name in resp.json()["error"] and "not found" in resp.json()["error"]


# --- with the tiny model ---------------------------------------------------------------------


def test_greedy_generation_is_deterministic_with_real_logprobs(
    ollama_server: OllamaEndpoint, tiny_ollama_model: str
) -> None:
    first = generate(
        ollama_server, tiny_ollama_model, options=greedy(), logprobs=True, top_logprobs=5
    )
    again = generate(
        ollama_server, tiny_ollama_model, options=greedy(), logprobs=True, top_logprobs=5
    )
    assert first["response"] == again["response"]
    assert first["done"] is True and first["done_reason"] in ("stop", "length")
    assert first["prompt_eval_count"] > 100 and 0 < first["eval_count"] <= 6
    logprobs = first["logprobs"]
    assert 0 < len(logprobs) <= first["eval_count"]
    assert "".join(e["token"] for e in logprobs) == first["response"]
    for entry in logprobs:
        top = entry["top_logprobs"]
        assert len(top) == 5
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # greedy: the generated token is the most likely one
        assert top[0]["token"] == entry["token"]
        assert top[0]["logprob"] == pytest.approx(entry["logprob"])
    assert [e["logprob"] for e in again["logprobs"]] == pytest.approx(
        [e["logprob"] for e in logprobs]
    )


def test_streaming_sends_the_same_answer_as_ndjson(
    ollama_server: OllamaEndpoint, tiny_ollama_model: str
) -> None:
    whole = generate(ollama_server, tiny_ollama_model, options=greedy())
    body = {"model": tiny_ollama_model, "prompt": PROMPT, "raw": True, "options": greedy()}
    with httpx.stream("POST", ollama_server.url + "/api/generate", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in r.iter_lines() if line.strip()]
    assert all(not e["done"] for e in events[:-1]) and events[-1]["done"] is True
    assert "".join(e["response"] for e in events) == whole["response"]
    assert events[-1]["eval_count"] == whole["eval_count"]


def test_stop_sequence_cuts_the_answer(
    ollama_server: OllamaEndpoint, tiny_ollama_model: str
) -> None:
    free = generate(ollama_server, tiny_ollama_model, options=greedy(8), logprobs=True)
    tokens = [e["token"] for e in free["logprobs"]]
    assert len(tokens) >= 3, free
    stop = tokens[2].strip() or tokens[2]
    cut = free["response"].index(stop)
    stopped = generate(ollama_server, tiny_ollama_model, options=greedy(8, stop=[stop]))
    assert stopped["response"] == free["response"][:cut]
    assert stopped["done_reason"] == "stop"


def test_empty_prompt_loads_and_keep_alive_zero_unloads(
    ollama_server: OllamaEndpoint, tiny_ollama_model: str
) -> None:
    loaded = ollama_server.post("/api/generate", json={"model": tiny_ollama_model}).json()
    assert (loaded["done"], loaded["done_reason"]) == (True, "load")
    body = {"model": tiny_ollama_model, "keep_alive": 0}
    unloaded = ollama_server.post("/api/generate", json=body).json()
    assert (unloaded["done"], unloaded["done_reason"]) == (True, "unload")


def test_create_show_copy_delete(
    ollama_server: OllamaEndpoint, tiny_gguf: Path, tiny_ollama_model: str
) -> None:
    name = "mailrouter-contract:v1"
    publish_gguf(ollama_server.url, Path(tiny_gguf), name, quantize="q8_0")
    listed = {m["name"]: m for m in ollama_server.get("/api/tags").json()["models"]}
    assert name in listed
    assert listed[name]["details"]["format"] == "gguf"
    assert listed[name]["details"]["quantization_level"] in ("Q8_0", "F32", "F16")
    shown = ollama_server.post("/api/show", json={"model": name}).json()
    assert "[/INST]" in shown["template"]
    assert "stop" in shown["parameters"]
    assert shown["model_info"]["general.architecture"] == "llama"

    copy = ollama_server.post("/api/copy", json={"source": name, "destination": "mr-copy"})
    assert copy.status_code == 200
    answer = generate(ollama_server, "mr-copy", options=greedy(3))
    assert answer["done"] is True
    for model in (name, "mr-copy"):
        resp = httpx.request("DELETE", ollama_server.url + "/api/delete", json={"model": model})
        assert resp.status_code == 200
    names = {m["name"] for m in ollama_server.get("/api/tags").json()["models"]}
    assert name not in names and "mr-copy:latest" not in names
    assert tiny_ollama_model in names


def test_create_streams_status_until_success(
    ollama_server: OllamaEndpoint, tiny_gguf: Path, tiny_ollama_model: str
) -> None:
    from tests.fixtures.ollama import delete_model, push_blob

    digest = push_blob(ollama_server.url, Path(tiny_gguf))
    body = {"model": "mr-streamed", "files": {"model.gguf": digest}}
    with httpx.stream("POST", ollama_server.url + "/api/create", json=body, timeout=300) as r:
        statuses = [json.loads(line)["status"] for line in r.iter_lines() if line.strip()]
    assert statuses[-1] == "success"
    delete_model(ollama_server.url, "mr-streamed")


# --- the test server only ----------------------------------------------------------------------


def test_prompt_tokens_have_bos_and_control_tokens(
    ollama_test_server: OllamaEndpoint, tiny_ollama_model: str
) -> None:
    generate(ollama_test_server, tiny_ollama_model, options=greedy(2))
    seen = ollama_test_server.last_tokens()
    assert seen["model"] == tiny_ollama_model
    tokens = seen["prompt_tokens"]
    # <s> [INST] … [/INST]: the BOS the GGUF asks for, and the control pieces parsed from text
    assert tokens[:2] == [1, 3] and tokens[-1] == 4
    assert tokens.count(3) == 1 and tokens.count(4) == 1
    assert 0 < len(seen["generated_tokens"]) <= 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"bogus": 1}, "unknown field"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"keep_alive": "soon"}, "invalid duration"),
        ({"options": {"temperature": "hot"}}, "temperature"),
        ({"options": {"no_such_option": 1}}, "invalid option"),
        ({"raw": "yes"}, "raw"),
    ],
)
def test_invalid_generate_requests_are_refused(
    ollama_test_server: OllamaEndpoint, tiny_ollama_model: str, body: dict, message: str
) -> None:
    resp = ollama_test_server.post(
        "/api/generate", json={"model": tiny_ollama_model, "prompt": "x", **body}
    )
    assert resp.status_code == 400
    assert message in resp.json()["error"]


def test_old_server_version_sends_no_logprobs(tmp_path: Path, tiny_gguf: Path) -> None:
    from tests.fixtures.ollama import start_test_server

    server = start_test_server(tmp_path / "store", "--version", "0.12.3")
    try:
        assert server.get("/api/version").json() == {"version": "0.12.3"}
        publish_gguf(server.url, Path(tiny_gguf), "old")
        answer = generate(server, "old", options=greedy(2), logprobs=True, top_logprobs=3)
        assert "logprobs" not in answer
    finally:
        server.stop()
