"""actors.reward: the three reward kinds and their errors, without Ray."""
from __future__ import annotations

import math
import socket
import time

import pytest
import torch

from actors.reward import (
    FunctionReward,
    HttpReward,
    ModelReward,
    RewardError,
    RewardSample,
    RewardSettings,
    make_reward,
)

pytestmark = pytest.mark.unit

HERE = __name__  # this module, as the reward functions below are named: f"{HERE}:name"


def samples(*pairs, extra=None) -> list[RewardSample]:
    return [RewardSample(p, r, dict(extra or {})) for p, r in pairs]


# --- reward functions used by the tests -------------------------------------------------------

def explode(prompt, response):
    if "boom" in response:
        raise ValueError("no reward for boom")
    return 1.0


def not_finite(prompt, response):
    return float("nan") if "nan" in response else float("inf") if "inf" in response else 0.5


def not_a_number(prompt, response):
    return "high"


def exact_match(prompt, response, answer):
    return float(response.strip() == answer)


def with_kwargs(prompt, response, **extra):
    return float(len(extra))


def with_default(prompt, response, *, bonus=0.0):
    return 1.0 + bonus


# --- function kind ----------------------------------------------------------------------------

def test_synthetic_reward_by_hand():
    scorer = make_reward(RewardSettings("function", function="orchestrator.synthetic:reward"))
    got = scorer.score(samples(("p", "sun gold river"), ("p", "ash dust fog gray"), ("p", "river table"),
                               ("p", "Sun, ash! river."), ("p", ""), ("p", "sun ash ash river")))
    assert got == pytest.approx([2 / 3, -1.0, 0.0, 0.0, 0.0, -0.25])


def test_function_that_raises_names_function_and_sample():
    scorer = FunctionReward(f"{HERE}:explode")
    batch = samples(("Describe the sea in a few words, please, with many words", "fine"),
                    ("List words about a train.", "fine"), ("Give me words for the harbor.", "boom"))
    with pytest.raises(RewardError) as err:
        scorer.score(batch)
    msg = str(err.value)
    assert f"reward function {HERE}:explode" in msg
    assert "sample 2 (prompt 'Give me words for the harbor.')" in msg
    assert "ValueError: no reward for boom" in msg
    batch[2].index = 17  # the position in the step's batch, when the driver gives it
    with pytest.raises(RewardError, match="sample 17 "):
        scorer.score(batch)


@pytest.mark.parametrize("response, shown", [("nan", "got nan"), ("inf", "got inf")])
def test_non_finite_reward_is_an_error(response, shown):
    with pytest.raises(RewardError) as err:
        FunctionReward(f"{HERE}:not_finite").score(samples(("a", "ok"), ("b", response)))
    assert f"reward function {HERE}:not_finite: sample 1 (prompt 'b'): {shown}, not a finite" in str(err.value)


def test_non_number_reward_is_an_error():
    with pytest.raises(RewardError, match=r"sample 0 .*got 'high' \(str\), not a number"):
        FunctionReward(f"{HERE}:not_a_number").score(samples(("a", "x")))


def test_long_prompt_is_cut_in_the_message():
    with pytest.raises(RewardError) as err:
        FunctionReward(f"{HERE}:explode").score(samples(("word " * 100, "boom")))
    assert "(prompt 'word word word word word word word word ...')" in str(err.value)


def test_extras_passed_when_accepted():
    rows = [RewardSample("q", "42", {"answer": "42", "topic": "math"}),
            RewardSample("q", "41", {"answer": "42", "topic": "math"})]
    assert FunctionReward(f"{HERE}:exact_match").score(rows) == [1.0, 0.0]  # named: answer only
    assert FunctionReward(f"{HERE}:with_kwargs").score(rows) == [2.0, 2.0]  # **kwargs: all
    assert FunctionReward(f"{HERE}:with_default").score(rows) == [1.0, 1.0]  # names neither
    assert FunctionReward(f"{HERE}:with_default").score(
        [RewardSample("q", "r", {"bonus": 0.5})]) == [1.5]
    # a two-parameter function never sees the extras
    assert FunctionReward("orchestrator.synthetic:reward").score(rows) == [0.0, 0.0]


def test_missing_required_extra_names_it():
    with pytest.raises(RewardError, match=r"sample 0 .*TypeError: .*'answer'"):
        FunctionReward(f"{HERE}:exact_match").score(samples(("q", "42")))


def test_function_that_cannot_be_imported():
    with pytest.raises(RewardError, match="reward function orchestrator.synthetic:nope: cannot import"):
        FunctionReward("orchestrator.synthetic:nope")


# --- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"kind": "remote"}, "reward.kind"),
    ({"kind": "http"}, "reward.url: required"),
    ({"kind": "model"}, "reward.model_path: required"),
    ({"kind": "function"}, "reward.function: required"),
    ({"kind": "function", "function": "orchestrator.synthetic"}, "reward.function: got"),
    ({"kind": "function", "function": "m:f", "url": "http://x"}, "reward.url: set, but only"),
    ({"kind": "http", "url": "localhost:8000"}, "reward.url: got"),
    ({"kind": "http", "url": "http://x", "timeout_s": 0}, "reward.timeout_s"),
    ({"kind": "http", "url": "http://x", "retries": -1}, "reward.retries"),
    ({"kind": "model", "model_path": "m", "micro_batch": 0}, "reward.micro_batch"),
    ({"kind": "model", "model_path": "m", "dtype": "fp8"}, "reward.dtype"),
    ({"kind": "function", "function": ":reward"}, "reward.function: got"),
    ({"kind": "http", "url": "http://x", "on_failure": "zero"}, "reward.on_failure: got"),
    ({"kind": "function", "function": "m:f", "on_failure": "drop"}, "reward.on_failure: 'drop'"),
    ({"kind": "function", "function": "m:f", "auth_env": "X"}, "reward.auth_env: set, but only"),
])
def test_settings_check_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RewardSettings(**kwargs).check()


def test_settings_check_passes():
    RewardSettings("http", url="https://rm.example/score").check()
    RewardSettings("function", function="orchestrator.synthetic:reward").check()


# --- http kind --------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def word_count(n, body):
    return 200, {"rewards": [len(r.split()) + e.get("bonus", 0)
                             for r, e in zip(body["responses"], body["extra"])]}


def http(url, **kw):
    kw = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.01, "micro_batch": 16, **kw}
    return HttpReward(url, **kw)


def test_http_rewards_in_order_over_several_requests(serve):
    with serve(word_count) as (url, calls):
        rows = [RewardSample(f"p{i}", "w " * i, {"bonus": 0.5} if i == 3 else {}) for i in range(5)]
        assert http(url, micro_batch=2).score(rows) == [0, 1, 2, 3.5, 4]
    assert [c["prompts"] for c in calls] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert calls[1]["extra"] == [{}, {"bonus": 0.5}]


def test_http_retries_a_failing_server(serve):
    def flaky(n, body):
        return (503, {"error": "warming up"}) if n < 2 else word_count(n, body)
    with serve(flaky) as (url, calls):
        assert http(url, retries=2).score(samples(("p", "a b"), ("p", "c"))) == [2.0, 1.0]
    assert len(calls) == 3


def test_http_server_that_stays_down(serve):
    with serve(lambda n, body: (500, {"error": "broken"})) as (url, calls):
        t0 = time.monotonic()
        with pytest.raises(RewardError) as err:
            http(url, retries=2).score(samples(("p", "a")))
        assert time.monotonic() - t0 < 5
    assert len(calls) == 3  # the first attempt and 2 retries
    assert f"reward endpoint {url}: no answer after 3 attempt(s)" in str(err.value)
    assert "last cause: HTTP 500" in str(err.value)


def test_http_on_failure_drop_scores_the_failed_request_nan(serve):
    """With on_failure drop, a request that gives up (here the second of three, after its one
    retry) scores NaN for its samples, never a number; the other requests score as usual."""
    def second_down(n, body):
        return (500, {"error": "broken"}) if body["prompts"][0] == "p2" else word_count(n, body)
    with serve(second_down) as (url, calls):
        rows = [RewardSample(f"p{i}", "w " * i, {}) for i in range(5)]
        got = http(url, retries=1, micro_batch=2, on_failure="drop").score(rows)
    assert got[:2] == [0, 1] and got[4] == 4
    assert math.isnan(got[2]) and math.isnan(got[3])
    assert len(calls) == 4  # 1 + (1 + 1 retry) + 1


def test_http_auth_header_comes_from_the_environment(serve, monkeypatch):
    seen = []
    with serve(word_count) as (url, _):
        monkeypatch.setenv("RM_TOKEN", "Bearer s3cret")
        import urllib.request
        real = urllib.request.urlopen

        def spy(request, timeout=None, **kw):
            seen.append(request.get_header("Authorization"))
            return real(request, timeout=timeout, **kw)
        monkeypatch.setattr(urllib.request, "urlopen", spy)
        assert http(url, auth_env="RM_TOKEN").score(samples(("p", "a b"))) == [2.0]
    assert seen == ["Bearer s3cret"]
    monkeypatch.delenv("RM_TOKEN")
    with pytest.raises(RewardError, match="reward.auth_env names RM_TOKEN, which is not set"):
        http("http://127.0.0.1:9/x", auth_env="RM_TOKEN")


def test_http_closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/score"
    t0 = time.monotonic()
    with pytest.raises(RewardError) as err:
        http(url, retries=3).score(samples(("p", "a")))
    assert time.monotonic() - t0 < 5
    assert f"reward endpoint {url}: no answer after 4 attempt(s)" in str(err.value)
    assert "ConnectionRefusedError" in str(err.value)


def test_http_timeout_is_bounded(serve):
    def slow(n, body):
        time.sleep(1.0)
        return word_count(n, body)
    expected = r"no answer after 2 attempt\(s\) \(timeout 0.2s each\).*timed out"
    t0 = time.monotonic()
    with serve(slow) as (url, _), pytest.raises(RewardError, match=expected):
        http(url, timeout_s=0.2, retries=1).score(samples(("p", "a")))
    assert time.monotonic() - t0 < 1.5


def test_http_client_error_is_not_retried(serve):
    with serve(lambda n, body: (400, {"error": "bad field"})) as (url, calls), \
            pytest.raises(RewardError) as err:
        http(url).score(samples(("p", "a")))
    assert f"reward endpoint {url}: HTTP 400 Bad Request" in str(err.value)
    assert len(calls) == 1


@pytest.mark.parametrize("payload, expected", [
    ({"rewards": [1.0]}, "answered 1 rewards for 2 samples (sample 0 (prompt 'p') onwards)"),
    ({"scores": [1.0, 2.0]}, "answer has no 'rewards' list"),
    ({"rewards": [1.0, None]}, "sample 1 (prompt 'q'): got None (NoneType), not a number"),
])
def test_http_bad_answers(payload, expected, serve):
    with serve(lambda n, body: (200, payload)) as (url, _), pytest.raises(RewardError) as err:
        http(url).score(samples(("p", "a"), ("q", "b")))
    assert f"reward endpoint {url}: " in str(err.value)
    assert expected in str(err.value)


# --- model kind -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    from orchestrator.reward_model import build_reward_model
    torch.set_num_threads(1)
    return str(build_reward_model(tmp_path_factory.mktemp("rm") / "model", "tiny", seed=0))


MODEL_SAMPLES = [("Describe the sea in a few words.", "sun gold river"),
                 ("List words about a train.", "ash dust fog gray slate iron lead stone mud"),
                 ("Write a short line on the desert.", "amber"),
                 ("What comes to mind about a city?", "bridge market signal lantern rocket"),
                 ("Give me words for the night sky.", "sun " * 30)]


def test_model_scores_match_transformers(reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    scorer = ModelReward(reward_model, micro_batch=3, dtype="float32", device="cpu")
    batch = samples(*MODEL_SAMPLES)
    scores = scorer.score(batch)
    assert len(scores) == len(batch) and all(math.isfinite(s) for s in scores)
    assert len({round(s, 6) for s in scores}) == len(scores)  # the head tells samples apart
    assert scorer.score(batch) == scores  # deterministic

    # batching and padding do not change a sample's score
    for row, score in zip(batch, scores):
        assert scorer.score([row])[0] == pytest.approx(score, abs=1e-5)

    # the same number straight from transformers, for one sample
    tok = AutoTokenizer.from_pretrained(reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    prompt, response = MODEL_SAMPLES[1]
    text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": response}], tokenize=False)
    with torch.no_grad():
        direct = model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert scores[1] == pytest.approx(direct, abs=1e-5)


def test_model_sample_too_long_names_it(reward_model):
    scorer = ModelReward(reward_model, micro_batch=4, dtype="float32", device="cpu")
    with pytest.raises(RewardError, match=r"reward model .*: sample 1 \(prompt 'long'\): \d+ tokens, allowed 1 to 1024"):
        scorer.score(samples(("short", "sun"), ("long", "river " * 2000)))


def test_causal_lm_dir_is_not_a_reward_model(tmp_path):
    from orchestrator.tiny_model import build_model
    path = build_model(tmp_path / "lm", "tiny")
    with pytest.raises(RewardError, match="not a trained reward model, weights missing for .*score"):
        ModelReward(str(path), micro_batch=4, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    """A certificate for 127.0.0.1 signed by itself (a private CA, as far as clients know)."""
    import subprocess
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_https_endpoint_is_verified_and_a_private_ca_is_trusted_only_when_given(serve,
                                                                               self_signed):
    with serve(word_count, tls=self_signed) as (url, calls):
        assert url.startswith("https://")
        t0 = time.monotonic()
        with pytest.raises(RewardError, match=rf"reward endpoint {url}: its TLS certificate is "
                                              rf"not trusted \(self-signed certificate\); .* "
                                              rf"reward.ca_bundle"):
            http(url, retries=3, backoff_s=1.0).score(samples(("p", "a b")))
        assert time.monotonic() - t0 < 1.0  # refused at once: no retries for a bad certificate
        assert http(url, ca_bundle=str(self_signed[0])).score(samples(("p", "a b"))) == [2.0]
    assert len(calls) == 1  # the refused request never reached the handler
