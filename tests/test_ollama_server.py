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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailrouter.chat_template import ChatTemplate
from mailrouter.config import default_departments
from mailrouter.prompt import build_prompt
from tests.fixtures.ollama import OllamaEndpoint, publish_gguf

PROMPT = ChatTemplate.mistral_v3().serving(
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


# --- Ollama's defaults for what a request does not send ----------------------------------------


def first_token(server: OllamaEndpoint, model: str, prompt: str, **options: Any) -> int:
    generate(server, model, prompt=prompt, options=greedy(1, **options))
    return [*server.last_tokens()["generated_tokens"], -1][0]  # -1: the end of generation


def test_options_not_sent_take_ollama_defaults(
    ollama_test_server: OllamaEndpoint, tiny_ollama_model: str
) -> None:
    """Ollama's DefaultOptions (api/types.go): what a client leaves out is not neutral."""
    generate(ollama_test_server, tiny_ollama_model, options={"num_predict": 1})
    options = ollama_test_server.last_tokens()["options"]
    assert options["repeat_penalty"] == 1.1 and options["repeat_last_n"] == 64
    assert options["top_k"] == 40 and options["top_p"] == 0.9 and options["num_keep"] == 4
    # the model's parameters come before the defaults, the request's before both
    assert options["temperature"] == 0 and options["num_ctx"] == 1024
    generate(ollama_test_server, tiny_ollama_model, options=greedy(1, repeat_penalty=1.0))
    assert ollama_test_server.last_tokens()["options"]["repeat_penalty"] == 1.0


def test_default_repeat_penalty_reaches_into_the_prompt(
    ollama_test_server: OllamaEndpoint, tiny_ollama_model: str
) -> None:
    """Under Ollama's default penalty greedy decoding is not the argmax: the llama.cpp runner
    accepts the prompt's tokens into the sampler, so an answer the email's last 64 tokens
    already name is pushed down. The email is grown with the model's own answer until it names
    it; then repeat_penalty 1.0 (or repeat_last_n 0) answers it, the defaults do not."""
    server, model, body = ollama_test_server, tiny_ollama_model, "Bonjour, un devis svp."
    for _ in range(6):
        prompt = ChatTemplate.mistral_v3().serving(
            build_prompt(body, default_departments(), subject="Devis")
        )
        answer = generate(server, model, prompt=prompt, options=greedy(1, repeat_penalty=1.0))
        seen = server.last_tokens()
        neutral, tail = seen["generated_tokens"][0], seen["prompt_tokens"][-64:]
        if neutral in tail:
            break
        body += answer["response"]  # now the email names what the model answers
    else:
        pytest.fail("the model never answered a token of the email")
    assert first_token(server, model, prompt, repeat_last_n=0) == neutral
    penalised = first_token(server, model, prompt)  # Ollama's defaults
    assert penalised != neutral and penalised not in tail


def test_a_prompt_longer_than_num_ctx_is_cut_after_its_first_tokens(
    ollama_test_server: OllamaEndpoint, tiny_ollama_model: str
) -> None:
    """As Ollama's runner (NewSequence): not refused, but the first num_keep tokens and the BOS
    are kept and those after them dropped; the answer then shifts the context."""
    generate(ollama_test_server, tiny_ollama_model, options=greedy(1))
    whole = ollama_test_server.last_tokens()["prompt_tokens"]
    answer = generate(ollama_test_server, tiny_ollama_model, options=greedy(4, num_ctx=64))
    seen = ollama_test_server.last_tokens()
    assert answer["prompt_eval_count"] == 64 and seen["prompt_truncated"] == len(whole) - 64
    assert seen["prompt_tokens"] == whole[:5] + whole[-59:]
    assert 0 < answer["eval_count"] <= 4


# --- create and blobs as Ollama accounts for them ------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[OllamaEndpoint]:
    """A private test server: these tests count every blob of its store."""
    from tests.fixtures.ollama import private_test_server

    with private_test_server(tmp_path / "store") as endpoint:
        yield endpoint


def _create(server: OllamaEndpoint, **body: object) -> httpx.Response:
    return server.post("/api/create", json={"stream": False, **body})


def _blobs(server: OllamaEndpoint) -> dict[str, list[str]]:
    return server.get("/_test/blobs").json()


def test_quantize_takes_ollamas_types_and_refuses_a_quantised_source(
    own_server: OllamaEndpoint, tiny_gguf: Path
) -> None:
    """``ggml.ParseFileType`` (fs/ggml/type.go) and ``createModel`` (server/create.go) of
    Ollama v0.13.0: any case, only F32/F16/Q8_0/Q4_K_S/Q4_K_M; a Q8_0 model cannot be a ``from``
    for ``quantize``; asking for the type a model already has changes nothing."""
    from tests.fixtures.ollama import push_blob

    files = {"model.gguf": push_blob(own_server.url, tiny_gguf)}
    refused = _create(own_server, model="mrq:bad", files=files, quantize="q4_0")
    assert refused.status_code == 500
    assert refused.json()["error"] == (
        "unsupported quantization type Q4_0 - supported types are F32, F16, Q4_K_S, Q4_K_M, Q8_0"
    )
    assert _create(own_server, model="mrq:f32", files=files, quantize="f32").status_code == 200
    assert _create(own_server, model="mrq:q8", files=files, quantize="q8_0").status_code == 200
    tags = {m["name"]: m for m in own_server.get("/api/tags").json()["models"]}
    assert tags["mrq:f32"]["details"]["quantization_level"] == "F32"
    assert tags["mrq:q8"]["details"]["quantization_level"] == "Q8_0"
    again = _create(own_server, model="mrq:again", **{"from": "mrq:q8"}, quantize="q4_K_M")
    assert again.status_code == 500
    assert again.json()["error"] == "quantization is only supported for F16 and F32 models"
    from_float = _create(own_server, model="mrq:from", **{"from": "mrq:f32"}, quantize="Q8_0")
    assert from_float.status_code == 200


def test_blobs_are_removed_as_ollama_removes_them(
    own_server: OllamaEndpoint, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quantising keeps the pushed blob (used by no model); deleting the model that uses a blob
    removes it; a restart prunes what no model uses, unless OLLAMA_NOPRUNE is set."""
    from tests.fixtures.ollama import push_blob

    digest = push_blob(own_server.url, tiny_gguf)
    hexdigest = digest.removeprefix("sha256:")
    assert _create(own_server, model="mrb:q8", files={"m.gguf": digest}, quantize="q8_0").is_success
    assert _blobs(own_server)["unused"] == [hexdigest]  # the float GGUF, kept by quantize

    monkeypatch.setenv("OLLAMA_NOPRUNE", "1")
    own_server.stop()
    own_server.start()
    assert _blobs(own_server)["unused"] == [hexdigest]
    monkeypatch.delenv("OLLAMA_NOPRUNE")
    own_server.stop()
    own_server.start()
    assert _blobs(own_server)["unused"] == []
    assert len(_blobs(own_server)["blobs"]) == 1  # the Q8_0 one, used by mrb:q8

    files = {"m.gguf": push_blob(own_server.url, tiny_gguf)}
    assert _create(own_server, model="mrb:f32", files=files).is_success
    assert _create(own_server, model="mrb:copy", **{"from": "mrb:f32"}).is_success
    httpx.request("DELETE", own_server.url + "/api/delete", json={"model": "mrb:f32"})
    assert len(_blobs(own_server)["blobs"]) == 2  # mrb:copy still uses the float one
    httpx.request("DELETE", own_server.url + "/api/delete", json={"model": "mrb:copy"})
    assert _blobs(own_server) == {"blobs": [f"sha256-{_q8(own_server)}"], "unused": []}


def _q8(server: OllamaEndpoint) -> str:
    shown = server.post("/api/show", json={"model": "mrb:q8"}).json()
    return shown["modelfile"].split("FROM ", 1)[1].split("\n", 1)[0].rsplit("sha256-", 1)[1]
