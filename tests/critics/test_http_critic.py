"""HTTPCritic against a real HTTP server on 127.0.0.1 (scripted replies, or replies of a tiny HF model).

Covers a good critique, timeouts, 5xx retries, 4xx, malformed bodies, the concurrency limit, the on-disk
cache, the counted fallback inside a real Lightning fit, and that the API key never leaks.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from sdlit.callbacks import StepCritique, clean_solution
from sdlit.critics import CriticHTTPError, CriticReplyError, CritiqueParseError, HFCritic, HTTPCritic

from conftest import CRITIC_QUESTION as QUESTION
from conftest import CRITIC_RESPONSE as RESPONSE
from conftest import CRITIC_SOLUTION as SOLUTION
from conftest import REPO_ROOT, critic_rollouts

KEY = "sk-test-SECRET-4d2b9f0e77"
GOOD_REPLY = ("<think>7 times 2 is 14, so step 2 is off.</think>\nVerdicts:\nStep 1: correct\n"
              "Step 2: wrong - 7 * 2 is 14, not 15\nAnswer: wrong\nCase: D\nCorrected solution:\n"
              "Step 1: 3 + 4 = 7\nStep 2: 7 * 2 = 14\nAnswer: 14")


def completion(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


class ChatServer:
    """A ThreadingHTTPServer serving POST /v1/chat/completions with ``script(n, body, headers)``.

    ``script`` returns (status, body bytes, delay seconds) for the n-th request (0-based). The server
    records every request and the most requests it ever had in flight at once.
    """

    def __init__(self, script):
        self.script = script
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                counted = True
                try:
                    if self.path != "/v1/chat/completions":
                        status, payload, delay = 404, b"no such route", 0.0
                    else:
                        status, payload, delay = server.script(n, body, dict(self.headers))
                    time.sleep(delay)
                    with server.lock:  # out of flight before the reply is sent: the client may send the next at once
                        server.in_flight -= 1
                        counted = False
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    if counted:
                        with server.lock:
                            server.in_flight -= 1

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(ChatServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("SDLIT_TEST_KEY", KEY)


def critic(server, **kwargs) -> HTTPCritic:
    settings = dict(model="critic-model", api_key_env="SDLIT_TEST_KEY", timeout=5.0, max_retries=2,
                    backoff=0.01, concurrency=4)
    return HTTPCritic(server.base_url, **{**settings, **kwargs})


def test_good_critique_is_parsed_into_the_first_error(serve):
    server = serve(lambda n, body, headers: (200, completion(GOOD_REPLY), 0.0))
    result = critic(server, temperature=0.0, max_tokens=321).critique(QUESTION, SOLUTION, RESPONSE)
    assert result.case == "wrong" and result.first_error == 1
    assert result.text.startswith("Step 2 is wrong: 7 * 2 is 14.\n") and "<think>" not in result.text
    (body,) = server.requests
    assert body["model"] == "critic-model" and body["temperature"] == 0.0 and body["max_tokens"] == 321
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert QUESTION in body["messages"][1]["content"] and "Step 2: 7 * 2 = 15" in body["messages"][1]["content"]
    assert server.headers[0]["Authorization"] == f"Bearer {KEY}"


def test_no_key_in_the_environment_sends_no_authorization(serve, monkeypatch):
    monkeypatch.delenv("SDLIT_TEST_KEY")
    server = serve(lambda n, body, headers: (200, completion(GOOD_REPLY), 0.0))
    critic(server).critique(QUESTION, SOLUTION, RESPONSE)
    assert "Authorization" not in server.headers[0]


def test_timeout_is_retried_then_reported(serve):
    server = serve(lambda n, body, headers: (200, completion(GOOD_REPLY), 1.0))
    start = time.monotonic()
    (outcome,) = critic(server, timeout=0.2, max_retries=1).critique_outcomes([(QUESTION, SOLUTION, RESPONSE)])
    assert isinstance(outcome, CriticHTTPError) and "no reply within 0.2s" in str(outcome)
    assert "2 attempt(s)" in str(outcome) and len(server.requests) == 2
    assert time.monotonic() - start < 1.5  # did not wait for the slow replies


def test_500_then_success_is_retried(serve):
    server = serve(lambda n, body, headers: (500, b"overloaded", 0.0) if n == 0 else (200, completion(GOOD_REPLY), 0.0))
    assert critic(server).critique(QUESTION, SOLUTION, RESPONSE).first_error == 1
    assert len(server.requests) == 2


def test_429_is_retried_but_400_is_not(serve):
    busy = serve(lambda n, body, headers: (429, b"slow down", 0.0) if n < 2 else (200, completion(GOOD_REPLY), 0.0))
    assert critic(busy).critique(QUESTION, SOLUTION, RESPONSE).case == "wrong" and len(busy.requests) == 3
    bad = serve(lambda n, body, headers: (400, b'{"error": "context too long"}', 0.0))
    with pytest.raises(CriticHTTPError, match="refused: HTTP 400.*context too long"):
        critic(bad).critique(QUESTION, SOLUTION, RESPONSE)
    assert len(bad.requests) == 1


def test_persistent_500_falls_back_and_is_counted(serve, caplog):
    server = serve(lambda n, body, headers: (500, b"internal error", 0.0))
    feedback = StepCritique(critic=critic(server, max_retries=2), fallback="reference")
    batch = critic_rollouts(2)
    with caplog.at_level(logging.WARNING):
        feedback.annotate(batch)
    assert len(server.requests) == 2 * 3
    assert feedback.failures == 2 and feedback.fallbacks == 2 and feedback.failure_kinds["CriticHTTPError"] == 2
    assert all(r.context == clean_solution(SOLUTION) and r.feedback["critic_fallback"] == "reference" for r in batch)
    assert "critic failed on 2 of 2 rollouts" in caplog.text and "HTTP 500" in caplog.text


@pytest.mark.parametrize("payload", [b"{not json", b'{"choices": []}',
                                     json.dumps({"choices": [{"message": {}}]}).encode()])
def test_malformed_body_is_a_reply_error_and_falls_back(serve, payload):
    server = serve(lambda n, body, headers: (200, payload, 0.0))
    (outcome,) = critic(server).critique_outcomes([(QUESTION, SOLUTION, RESPONSE)])
    assert isinstance(outcome, CriticReplyError) and len(server.requests) == 1
    feedback = StepCritique(critic=critic(server), fallback="none")
    batch = critic_rollouts(1)
    feedback.annotate(batch)
    assert (feedback.fallbacks == 1 and batch[0].context is None
            and batch[0].feedback["critic_error"] == "CriticReplyError")


def test_unparseable_reply_falls_back_while_the_rest_of_the_batch_keeps_its_critique(serve):
    def script(n, body, headers):
        user = body["messages"][-1]["content"]
        return 200, completion(GOOD_REPLY if "7 * 2 = 15" in user else "Looks fine to me!"), 0.0
    server = serve(script)
    batch = critic_rollouts(1) + critic_rollouts(1, "Step 1: 3 + 4 = 7\nAnswer: 7")
    feedback = StepCritique(critic=critic(server))
    feedback.annotate(batch)
    assert batch[0].feedback == {"case": "wrong", "first_error": 1}
    assert batch[1].feedback["critic_error"] == "CritiqueParseError" and feedback.failures == 1


def test_slow_server_sees_at_most_concurrency_requests_at_once(serve):
    server = serve(lambda n, body, headers: (200, completion(GOOD_REPLY), 0.15))
    items = [(QUESTION, SOLUTION, RESPONSE.replace("15", str(15 + i))) for i in range(10)]
    outcomes = critic(server, concurrency=3).critique_outcomes(items)
    assert len(server.requests) == 10 and all(o.first_error == 1 for o in outcomes)
    assert 2 <= server.max_in_flight <= 3, server.max_in_flight
    # order is kept: the i-th critique belongs to the i-th response
    assert [o.steps[1].text for o in outcomes] == [f"7 * 2 = {15 + i}" for i in range(10)]


def test_rerun_reads_the_cache_and_sends_nothing(serve, tmp_path):
    server = serve(lambda n, body, headers: (200, completion(GOOD_REPLY), 0.0))
    items = [(QUESTION, SOLUTION, RESPONSE), (QUESTION, SOLUTION, RESPONSE + " apples")]
    first = critic(server, cache_dir=str(tmp_path / "cache")).critique_batch(items)
    assert len(server.requests) == 2
    rerun = critic(server, cache_dir=str(tmp_path / "cache"))
    assert rerun.critique_batch(items) == first and len(server.requests) == 2
    assert rerun.cache.hits == 2 and rerun.cache.misses == 0
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 2 and not list((tmp_path / "cache").rglob(".tmp-*"))
    assert all(KEY not in f.read_text() for f in files)
    critic(server, cache_dir=str(tmp_path / "cache"), temperature=0.7).critique_batch(items[:1])
    assert len(server.requests) == 3  # other sampling settings: another key


def test_failures_are_not_cached(serve, tmp_path):
    server = serve(lambda n, body, headers: (500, b"down", 0.0) if n == 0 else (200, completion(GOOD_REPLY), 0.0))
    (outcome,) = critic(server, max_retries=0, cache_dir=str(tmp_path)).critique_outcomes(
        [(QUESTION, SOLUTION, RESPONSE)])
    assert isinstance(outcome, CriticHTTPError)
    assert critic(server, max_retries=0, cache_dir=str(tmp_path)).critique(
        QUESTION, SOLUTION, RESPONSE).first_error == 1


def test_key_is_redacted_from_errors_and_absent_from_the_object(serve):
    echo = serve(lambda n, body, headers: (401, f"bad key: {headers['Authorization']}".encode(), 0.0))
    http_critic = critic(echo)
    with pytest.raises(CriticHTTPError) as info:
        http_critic.critique(QUESTION, SOLUTION, RESPONSE)
    assert KEY not in str(info.value) and "Bearer ***" in str(info.value)
    assert KEY not in repr(http_critic) and KEY not in repr(vars(http_critic))


def test_replies_generated_by_a_tiny_hf_model_over_http(serve, tiny_model_dir):
    local = HFCritic(tiny_model_dir, device="cpu", max_new_tokens=12, batch_size=1)
    local.load()

    def script(n, body, headers):
        return 200, completion(local.generate([body["messages"]])[0]), 0.0
    server = serve(script)
    remote = critic(server, concurrency=2)
    items = [(QUESTION, SOLUTION, RESPONSE), (QUESTION, SOLUTION, "Step 1: 3 + 4 = 7\nAnswer: 7")]
    assert remote.replies(items) == local.replies(items)
    # a random model writes no critique: each rollout falls back, counted
    assert all(isinstance(o, CritiqueParseError) for o in remote.critique_outcomes(items))
    feedback = StepCritique(critic=remote)
    feedback.annotate(critic_rollouts(2))
    assert feedback.failures == 2 and feedback.failure_kinds["CritiqueParseError"] == 2


def test_fit_goes_on_with_a_failing_critic_and_never_writes_the_key(serve, tmp_path, tiny_model_dir, caplog):
    from sdlit.cli import run_cli

    from conftest import write_config

    server = serve(lambda n, body, headers: (503, f"down; you sent {headers.get('Authorization')}".encode(), 0.0))
    step_critique = {"class_path": "sdlit.callbacks.StepCritique", "init_args": {"fallback": "reference", "critic": {
        "class_path": "sdlit.critics.HTTPCritic",
        "init_args": {"base_url": server.base_url, "model": "critic-model", "api_key_env": "SDLIT_TEST_KEY",
                      "max_retries": 1, "backoff": 0.01, "timeout": 5.0}}}}
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "every_n_train_steps": 1}}
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}}
    config = write_config(tmp_path, tiny_model_dir, callbacks=["BinaryReward", step_critique, checkpoint],
                          extra_trainer={"logger": logger, "enable_checkpointing": True, "log_every_n_steps": 1})
    with caplog.at_level(logging.DEBUG):
        cli = run_cli(["fit", "--config", config])
    assert cli.trainer.global_step == 2
    feedback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, StepCritique))
    assert feedback.failures == feedback.fallbacks == 4 and len(server.requests) == 8  # 2 steps x 2 rollouts x 2 tries
    metrics = (tmp_path / "logs").rglob("metrics.csv")
    rows = [line for path in metrics for line in path.read_text().splitlines()]
    header = rows[0].split(",")
    last = [dict(zip(header, r.split(","), strict=False)) for r in rows[1:]
            if r.split(",")[header.index("critic/failures")]][-1]
    assert float(last["critic/failures"]) == 4 and float(last["critic/fallbacks"]) == 4
    assert "503" in caplog.text and KEY not in caplog.text
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts]
    saved_configs = [p for p in written if p.name == "config.yaml" and p.parent != tmp_path]
    assert saved_configs and any(p.suffix == ".ckpt" for p in written)
    assert "SDLIT_TEST_KEY" in saved_configs[0].read_text()
    assert yaml.safe_load(saved_configs[0].read_text())["trainer"]["callbacks"]
    for path in written:
        assert KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def test_paper_configs_state_the_papers_setup(capsys):

    from conftest import print_config

    root = REPO_ROOT / "configs/paper"
    per_step = {}
    for name in ("grpo", "reference", "critique"):
        cfg = print_config(["--config", str(root / f"{name}.yaml")], capsys)
        model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
        assert model["model"] == "Qwen/Qwen3-1.7B" and model["learning_rate"] == 5e-6 and model["teacher"] == "base"
        assert (model["lora"]["r"], model["lora"]["alpha"]) == (64, 128)
        assert model["student_template_kwargs"] == {"enable_thinking": False}
        assert model["teacher_template_kwargs"] == {"enable_thinking": True}
        assert trainer["precision"] == "bf16-mixed" and data["sampling"]["temperature"] == 1.1
        assert data["sampling"]["max_new_tokens"] == 2048
        per_step[name] = data["batch_size"] * data["rollouts_per_problem"] * trainer["accumulate_grad_batches"]
        best = [c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
        assert best[0]["init_args"]["monitor"] == f"val/avg@{data['evaluation']['k']}" == "val/avg@12"
        critiques = [c for c in trainer["callbacks"] if c["class_path"].endswith("StepCritique")]
        assert bool(critiques) == (name == "critique")
    assert per_step == {"grpo": 32, "reference": 32, "critique": 32}
    critic = critiques[0]["init_args"]["critic"]
    assert critic["class_path"] == "sdlit.critics.HTTPCritic"
    assert critic["init_args"]["model"] == "Qwen/QwQ-32B" and critic["init_args"]["api_key_env"] == "OPENAI_API_KEY"
    assert critic["init_args"]["temperature"] == 0.0
