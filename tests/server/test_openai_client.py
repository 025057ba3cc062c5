"""The official openai client against a real `llmcore serve` process on 127.0.0.1."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=60) as c:
        yield c


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny", "tiny2", "tight", "slow"]
    m = client.models.retrieve("tiny2")
    assert m.id == "tiny2" and m.owned_by == "llmcore"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completion(client):
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    # greedy is deterministic
    r2 = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=7, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_completion_several_prompts_n_and_token_ids(client):
    r = client.completions.create(model="tiny", prompt=["one", "two", "three"], max_tokens=3, n=2,
                                  temperature=0.9, seed=3)
    assert [c.index for c in r.choices] == list(range(6))
    assert r.usage.completion_tokens == 18
    ids = client.completions.create(model="tiny", prompt=[[1, 2, 3], [4, 5]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5
    one = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert one.choices[0].text == ids.choices[0].text


def test_completion_seed_reproducible(client):
    kw = dict(model="tiny", prompt="Seeded", max_tokens=8, temperature=1.0, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_completion_logprobs_echo_and_stop(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and len(lp.top_logprobs) == 4
    assert all(3 <= len(t) <= 4 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    e = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, echo=True)
    assert e.choices[0].text == "Hello" + r.choices[0].text
    # a stop string cuts the text before it, streaming or not
    full = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:8]
    cut = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[: full.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Hello", max_tokens=20, temperature=0, stop=[stop], stream=True) if c.choices)
    assert streamed == cut.choices[0].text


def test_chat(client):
    r = client.chat.completions.create(model="tiny", messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
        max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    # content parts and developer role are accepted
    r2 = client.chat.completions.create(model="tiny", messages=[
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}], max_tokens=5, temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    # greedy: the chosen token is the most likely one
    assert all(t.token == t.top_logprobs[0].token for t in content)


def test_chat_streaming_with_usage(client):
    full = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me"}],
                                          max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell me"}], max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_chat_streaming_n2_without_usage(client):
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2, temperature=1.0, seed=5,
        stream=True))
    by_index: dict[int, str] = {}
    done = set()
    for c in chunks:
        assert c.usage is None
        for ch in c.choices:
            by_index[ch.index] = by_index.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                done.add(ch.index)
    assert set(by_index) == {0, 1} and done == {0, 1}


def test_completion_streaming(client):
    full = client.completions.create(model="tiny2", prompt="abc", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny2", prompt="abc", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10


def test_two_models_are_two_engines(client):
    a = client.completions.create(model="tiny", prompt="Same prompt", max_tokens=8, temperature=0)
    b = client.completions.create(model="tiny2", prompt="Same prompt", max_tokens=8, temperature=0)
    assert a.model == "tiny" and b.model == "tiny2"
    assert a.choices[0].text != b.choices[0].text  # different random weights


def test_embeddings_float_and_base64(client):
    # the openai client asks for base64 by default and decodes it
    e = client.embeddings.create(model="tiny", input=["hello world", "bye"])
    assert [d.index for d in e.data] == [0, 1] and len(e.data[0].embedding) == 64
    f = client.embeddings.create(model="tiny", input="hello world", encoding_format="float")
    assert np.allclose(f.data[0].embedding, e.data[0].embedding, atol=1e-6)
    assert e.usage.prompt_tokens > 0


def test_embeddings_are_transformers_mean_pooled_last_hidden_state(client, tiny_model):
    """What docs/serving.md promises: the mean over the input's tokens of the model's last
    hidden state (after the final norm), here against transformers on the same float32 weights."""
    model = transformers.AutoModel.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_model))
    texts = ["The quick brown fox jumps over the lazy dog", "bye"]
    ids = [tokenizer.encode(t) for t in texts] + [[5, 17, 300, 42, 42, 9]]
    got = client.embeddings.create(model="tiny", input=texts, encoding_format="float").data
    got += client.embeddings.create(model="tiny", input=ids[2:], encoding_format="float").data
    with torch.no_grad():
        hidden = [model(torch.tensor([x])).last_hidden_state[0].numpy() for x in ids]
    for x, g, h in zip(ids, got, hidden):
        want = h.mean(0)
        assert np.allclose(g.embedding, want, rtol=1e-4, atol=1e-5), (x, np.abs(g.embedding - want).max())
        if len(x) > 1:  # pooled, not the last token's state
            assert not np.allclose(g.embedding, h[-1], atol=1e-3)


def test_api_keys(server, client):
    with openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as ei:
            bad.models.list()
        assert ei.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    with openai.OpenAI(base_url=server.base_url, api_key=server.second_key, max_retries=0) as second:
        assert second.completions.create(model="tiny", prompt="x", max_tokens=1).choices
    # every route but /health and the static chat page needs the key
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/embeddings"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                         ("GET", "/docs"), ("GET", "/v1/models/tiny"), ("GET", "/no/such/route")]:
        r = httpx.request(method, server.url + path, json={})
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        r = httpx.request(method, server.url + path, json={}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/").status_code == 200


def test_errors_through_the_client(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.completions.create(model="gpt-4", prompt="x")
    assert ei.value.body["param"] == "model" and ei.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=9)
    assert ei.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model="tiny", prompt="x", max_tokens=100000)
    assert ei.value.body["param"] == "max_tokens" and ei.value.body["code"] == "context_length_exceeded"


def test_metrics_are_labelled_by_model(server, client, auth):
    client.completions.create(model="tiny2", prompt="metrics", max_tokens=3)
    text = httpx.get(server.url + "/metrics", headers=auth).text
    for name in ["llmcore_requests_total", "llmcore_time_to_first_token_seconds_bucket",
                 "llmcore_inter_token_latency_seconds_bucket", "llmcore_e2e_request_latency_seconds_bucket",
                 "llmcore_prompt_tokens_total", "llmcore_generation_tokens_total", "llmcore_num_requests_running",
                 "llmcore_num_requests_waiting", "llmcore_kv_blocks_used", "llmcore_prefix_cache_hit_rate"]:
        assert f'{name}{{' in text, name
    assert 'llmcore_requests_total{model="tiny2",route="/v1/completions",status="200"}' in text
    assert 'llmcore_kv_blocks_total{model="tight"}' in text
    line = next(ln for ln in text.splitlines() if ln.startswith('llmcore_generation_tokens_total{model="tiny2"}'))
    assert float(line.split()[-1]) >= 3
