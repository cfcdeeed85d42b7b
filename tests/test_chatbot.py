"""The chatbot: prompt building and trimming, answer stops, the gradio app driven by gradio_client and by a
real headless browser (Debian's chromium over the DevTools protocol; skipped when it is not installed),
and the terminal chat. Everything runs on the micro model, on CPU, offline."""
import base64
import concurrent.futures
import contextlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest
import torch

from alpaca_rlhf.deepspeed_chat.training.utils.data.prompt_format import build_prompt
from alpaca_rlhf.inference.chat_core import (GenerationSettings, StopGeneration, build_chat_prompt,
                                             cut_at_next_turn, load_chat_model, stream_answer, visible_answer)

from conftest import REPO, free_port

CHROMIUM = "/usr/bin/chromium"
FAST = dict(max_new_tokens=8)  # the micro model writes gibberish anyway: a few tokens prove the plumbing


@pytest.fixture(scope="module")
def chat_model(micro_model_dir):
    return load_chat_model(micro_model_dir, dtype="fp32", device="cpu", name="micro")


def prompt_ids(tokenizer, text):
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("history, expected", [
    ([], "\n\nHuman: how are you?\n\nAssistant:"),
    ([("hi", "hello")], "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"),
    ([("hi", " hello "), ("2+2?", "4")],
     "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: how are you?\n\nAssistant:"),
])
def test_prompt_is_the_training_format(tokenizer, history, expected):
    text, ids, dropped = build_chat_prompt(tokenizer, history, "how are you?", max_prompt_tokens=1000)
    assert text == expected == build_prompt(history, "how are you?")
    assert ids == prompt_ids(tokenizer, expected) and ids[0] == tokenizer.bos_token_id
    assert dropped == 0


def test_trimming_drops_oldest_turns_first(tokenizer):
    history = [(f"question {i}", f"answer number {i}") for i in range(5)]
    full = len(build_chat_prompt(tokenizer, history, "last one", 10_000)[1])
    without_two = len(prompt_ids(tokenizer, build_prompt(history[2:], "last one")))
    text, ids, dropped = build_chat_prompt(tokenizer, history, "last one", max_prompt_tokens=without_two)
    assert full > without_two and dropped == 2 and len(ids) == without_two
    assert text == build_prompt(history[2:], "last one")
    assert "question 1" not in text and "question 2" in text and text.endswith("Human: last one\n\nAssistant:")
    # Down to the bare message when nothing else fits.
    alone = len(prompt_ids(tokenizer, build_prompt([], "last one")))
    text, _, dropped = build_chat_prompt(tokenizer, history, "last one", max_prompt_tokens=alone)
    assert dropped == 5 and text == "\n\nHuman: last one\n\nAssistant:"


def test_trimming_a_long_history_renders_the_prompt_a_logarithmic_number_of_times(tokenizer, monkeypatch):
    """Each limit gives the same prompt as dropping one turn at a time (the slow reference), and a 2000-turn
    client history takes about log2(2000) renderings, not 2000."""
    import alpaca_rlhf.inference.chat_core as core
    history = [(f"question {i}", f"answer {i} " * (i % 4 + 1)) for i in range(40)]

    def slow(limit):
        for dropped in range(len(history) + 1):
            ids = prompt_ids(tokenizer, build_prompt(history[dropped:], "now"))
            if len(ids) <= limit:
                return build_prompt(history[dropped:], "now"), ids, dropped

    full = len(prompt_ids(tokenizer, build_prompt(history, "now")))
    for limit in range(len(prompt_ids(tokenizer, build_prompt([], "now"))), full + 2, 37):
        assert build_chat_prompt(tokenizer, history, "now", limit) == slow(limit), limit
    renders = []
    real = core._render
    monkeypatch.setattr(core, "_render", lambda *a: renders.append(1) or real(*a))
    long_history = [(f"q{i}", f"a{i}") for i in range(2000)]
    _, ids, dropped = build_chat_prompt(tokenizer, long_history, "now", max_prompt_tokens=200)
    assert len(ids) <= 200 and 1900 < dropped < 2000 and len(renders) <= 13


def test_too_long_message_raises(tokenizer):
    with pytest.raises(ValueError, match=r"message too long: \d+ tokens, at most 20"):
        build_chat_prompt(tokenizer, [("a", "b")], "word " * 50, max_prompt_tokens=20)


# ----------------------------------------------------------------------------------------------- stops
def test_cut_at_next_human_turn():
    assert cut_at_next_turn(" Paris.\n\nHuman: and Spain?") == (" Paris.\n\n", True)
    assert cut_at_next_turn("Human: x") == ("", True)
    assert cut_at_next_turn(" a NonHuman: b") == (" a NonHuman: b", False)  # a marker only after whitespace
    assert visible_answer(" Paris.\n\nHuman: and Spain?") == "Paris."
    # While streaming, what may be the start of a marker is held back; at the end it is kept.
    assert visible_answer(" Paris.\n\nHum") == "Paris."
    assert visible_answer(" Paris.\n\nHum", final=True) == "Paris.\n\nHum"


def test_stopping_criterion_sees_the_marker_in_the_answer_only(tokenizer):
    prompt = prompt_ids(tokenizer, build_prompt([("q", "a")], "hi"))  # the prompt is full of markers
    stop = StopGeneration(tokenizer, len(prompt))
    answer = tokenizer(" fine, thanks.", add_special_tokens=False)["input_ids"]
    marker = tokenizer("\n\nHuman: what", add_special_tokens=False)["input_ids"]
    assert stop(torch.tensor([prompt + answer]), None).tolist() == [False]
    assert stop(torch.tensor([prompt + answer + marker]), None).tolist() == [True]
    stop.cancel()
    assert stop(torch.tensor([prompt + answer]), None).tolist() == [True]


def scripted(chat_model, monkeypatch, script):
    """Make the model write `script` (token ids) token by token, then token 0 forever: its real forward runs,
    and the last position's logits are replaced. Returns the list of steps the model was asked for."""
    model, steps = chat_model.model, []
    real_forward = model.forward
    prompt_len = {}

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        length = kwargs["attention_mask"].shape[1]  # prompt + tokens generated so far
        step = length - prompt_len.setdefault("n", length)
        steps.append(step)
        out.logits[:, -1, :] = -1e4
        out.logits[:, -1, script[step] if step < len(script) else 0] = 1e4
        return out

    monkeypatch.setattr(model, "forward", forward)
    return steps


def test_generation_stops_at_eos(chat_model, monkeypatch):
    tok = chat_model.tokenizer
    ok = tok(" ok", add_special_tokens=False)["input_ids"]
    steps = scripted(chat_model, monkeypatch, ok + [tok.eos_token_id] + ok * 20)
    ids = prompt_ids(tok, build_prompt([], "hi"))
    answers = list(stream_answer(chat_model.model, tok, ids, GenerationSettings(max_new_tokens=40)))
    assert answers[-1] == "ok" and max(steps) == len(ok)  # the step that wrote EOS was the last one


def test_generation_stops_at_the_next_human_turn(chat_model, monkeypatch):
    tok = chat_model.tokenizer
    script = tok(" fine.\n\nHuman: next question", add_special_tokens=False)["input_ids"]
    steps = scripted(chat_model, monkeypatch, script)
    ids = prompt_ids(tok, build_prompt([], "hi"))
    answers = list(stream_answer(chat_model.model, tok, ids, GenerationSettings(max_new_tokens=40)))
    assert answers[-1] == "fine." and all("Human" not in a for a in answers)
    marker_end = len(tok(" fine.\n\nHuman:", add_special_tokens=False)["input_ids"])
    assert max(steps) == marker_end - 1  # stopped at the step that completed the marker


def test_beam_search_yields_once(chat_model):
    ids = prompt_ids(chat_model.tokenizer, build_prompt([], "hi"))
    answers = list(stream_answer(chat_model.model, chat_model.tokenizer, ids,
                                 GenerationSettings(max_new_tokens=6, num_beams=2)))
    assert len(answers) == 1 and isinstance(answers[0], str)


# ----------------------------------------------------------------------------------------------- the app
@contextlib.contextmanager
def served(demo):
    """`demo` on a free port of 127.0.0.1, in this process (so a test can look inside); yields its URL."""
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def app(chat_model):
    """The gradio app as main() builds it (its queue included), with short answers."""
    from alpaca_rlhf.inference.llama_chatbot_gradio import build_demo
    with served(build_demo([chat_model], GenerationSettings(**FAST))) as url:
        yield url


def test_two_turns_through_gradio_client(app, monkeypatch):
    from gradio_client import Client
    import alpaca_rlhf.inference.llama_chatbot_gradio as gui
    prompts = []
    real = gui.stream_answer
    monkeypatch.setattr(gui, "stream_answer",
                        lambda model, tok, ids, s, *stop: prompts.append(tok.decode(ids)) or real(model, tok, ids, s, *stop))
    client = Client(app, verbose=False)
    settings = [8, False, 0.7, 0.9, 0, 1, 1.0]  # max_new_tokens, sampling, temperature, top_p, top_k, beams, rep.
    box, history = client.predict("What is the capital of France?", [], *settings, api_name="/chat")
    assert box == "" and [m["role"] for m in history] == ["user", "assistant"]
    box, history = client.predict("And of Spain?", history, *settings, api_name="/chat")
    texts = [part["text"] for m in history for part in m["content"]]
    assert box == "" and [m["role"] for m in history] == ["user", "assistant"] * 2
    assert all(isinstance(t, str) for t in texts)
    assert texts[0] == "What is the capital of France?" and texts[2] == "And of Spain?"
    # The second prompt carried the first turn, in the training format.
    assert prompts[1] == "<s>" + build_prompt([(texts[0], texts[1])], "And of Spain?")
    # Empty and too-long messages get a note in the chat, not an error; the note is not fed back.
    box, noted = client.predict("  ", history, *settings, api_name="/chat")
    assert noted[-1]["metadata"]["title"] and "Type a message" in noted[-1]["content"][0]["text"]
    box, noted = client.predict("word " * 2000, noted, *settings, api_name="/chat")
    assert "message too long" in noted[-1]["content"][0]["text"] and box.startswith("word")
    assert client.predict(api_name="/clear") == []


USERS, LOAD_SECONDS, REPLY_TIMEOUT = 8, 25, 60  # with the server start and the first answer: about 30 s
# Every user sends the same first message with greedy decoding, so every answer must be the one a lone request
# gets: an answer cut short or mixed up under load shows. Long enough answers that eight users fill the line.
GREETING, SETTINGS = "Hello, who are you?", [32, False, 0.7, 0.9, 0, 1, 1.0]


def ask(client, timeout: float) -> str:
    """The answer to GREETING in a new conversation; raises what the client raises (QueueError when refused)."""
    box, history = client.submit(GREETING, [], *SETTINGS, api_name="/chat").result(timeout=timeout)
    last = history[-1]
    assert box == "" and last["role"] == "assistant" and not last.get("metadata"), (box, history)
    return last["content"][0]["text"]


def user_session(url: str, deadline: float, outcomes: list):
    """One user with a client of their own, asking until `deadline`: each outcome is the answer, "refused"
    (the queue was full) or a description of what went wrong."""
    from gradio_client import Client
    from gradio_client.utils import QueueError
    client = Client(url, verbose=False)
    try:
        while time.time() < deadline:
            try:
                outcomes.append(ask(client, REPLY_TIMEOUT))  # bounded: a request left hanging fails the test
            except QueueError as e:
                outcomes.append("refused" if "queue is full" in str(e).lower() else f"QueueError: {e}")
                time.sleep(0.2)  # a refused user tries again a moment later, not in a busy loop
            except concurrent.futures.TimeoutError:
                outcomes.append(f"no reply in {REPLY_TIMEOUT} s")
            except Exception as e:  # reported with the rest, so the other users go on
                outcomes.append(f"{type(e).__name__}: {e}")
    finally:
        client.close()


@pytest.mark.slow
def test_eight_users_against_a_small_queue_are_answered_or_refused_never_left_hanging(chat_model):
    """One answer at a time and two requests waiting at most: eight users who keep asking for LOAD_SECONDS each
    get the answer or gradio's "Queue is full" (both at least once); no request is left hanging."""
    from gradio_client import Client
    from alpaca_rlhf.inference.llama_chatbot_gradio import build_demo
    outcomes = [[] for _ in range(USERS)]
    with served(build_demo([chat_model], GenerationSettings(**FAST), concurrency_limit=1, max_queue=2)) as url:
        alone = Client(url, verbose=False)
        expected = ask(alone, REPLY_TIMEOUT)
        alone.close()
        assert expected, "the micro model's answer to the greeting is empty: pick another greeting"
        deadline = time.time() + LOAD_SECONDS
        users = [threading.Thread(target=user_session, args=(url, deadline, outcomes[i]), daemon=True)
                 for i in range(USERS)]
        for u in users:
            u.start()
        for u in users:  # the last request may start just before the deadline and wait its full timeout
            u.join(timeout=max(0.0, deadline - time.time()) + REPLY_TIMEOUT + 15)
        assert not [i for i, u in enumerate(users) if u.is_alive()], "a user's request never came back"
    everything = [o for user in outcomes for o in user]
    assert not [o for o in everything if o not in (expected, "refused")], everything
    assert all(outcomes), "a user's client never sent a request"
    assert everything.count(expected) >= 1 and everything.count("refused") >= 1, everything


def test_chat_function_ignores_notes_and_reports_bad_settings(chat_model):
    from alpaca_rlhf.inference.llama_chatbot_gradio import make_chat_fn, notice, to_turns
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]},
               notice("something"), {"role": "user", "content": "failed one"}, notice("generation failed")]
    assert to_turns(history) == [("hi", "yo")]
    chat = make_chat_fn([chat_model])
    *_, (box, out) = chat("hello", history, 8, True, 0.0, 0.9, 0, 1, 1.0)  # sampling at temperature 0
    assert box == "hello" and "temperature" in out[-1]["content"] and out[-1]["metadata"]["title"]


def client_history(turns: int) -> list:
    # Fixed-width texts: every turn renders to as many characters, whatever its number.
    return [m for i in range(turns) for m in ({"role": "user", "content": f"q{i:05d}"},
                                              {"role": "assistant", "content": f"a{i:05d}"})]


def counting(method, texts: list):
    """`method` (a tokenizer's encoding method) that first records the text it is given in `texts`."""
    def wrapper(self, text, *args, **kwargs):
        texts.append(text)
        return method(self, text, *args, **kwargs)
    return wrapper


def chat_work(chat_model, monkeypatch, turns: int):
    """One chat request after a client history of `turns` turns, through the endpoint's function: (the texts
    the tokenizer was given, the notes shown, the number of turns the prompt was built from, the textbox value
    and the messages sent back)."""
    import alpaca_rlhf.inference.llama_chatbot_gradio as gui
    tokenized, notes, seen = [], [], []
    real = gui.build_chat_prompt
    with monkeypatch.context() as patch:
        patch.setattr(gui.gr, "Info", notes.append)
        patch.setattr(gui, "build_chat_prompt", lambda tok, t, *a: seen.append(len(t)) or real(tok, t, *a))
        # On the class: the chat format keeps its own reference to the tokenizer. Both ways of encoding count.
        cls = type(chat_model.tokenizer)
        for name in ("__call__", "encode"):
            patch.setattr(cls, name, counting(getattr(cls, name), tokenized))
        chat = gui.make_chat_fn([chat_model])
        *_, (box, messages) = chat("now", client_history(turns), 4, False, 0.7, 0.9, 0, 1, 1.0)
    return tokenized, notes, seen, box, messages


def test_a_client_history_beyond_the_bound_is_cut_with_a_note(chat_model, monkeypatch):
    """A 2000-turn client history: only the latest turns are read, with a note; the tokenizer is given about
    log2(kept turns) prompts, of the kept turns only, so the work does not grow with the history sent."""
    import math
    import alpaca_rlhf.inference.llama_chatbot_gradio as gui
    bound = gui.MAX_HISTORY_TURNS
    tokenized, notes, seen, box, messages = chat_work(chat_model, monkeypatch, 2000)
    assert seen == [bound] and notes[0].endswith(f"only the latest {bound} of 2000 turns are read")
    # The answer comes back after the history, which is returned whole (only the prompt is cut).
    assert box == "" and len(messages) == 2 * 2000 + 2 and messages[-2] == {"role": "user", "content": "now"}
    assert messages[-1]["role"] == "assistant" and isinstance(messages[-1]["content"], str)
    assert "metadata" not in messages[-1]  # an answer, not a failure notice
    # Bisection over the kept turns (plus the message alone), and no turn older than the kept ones tokenized.
    assert 1 <= len(tokenized) <= math.ceil(math.log2(bound)) + 2
    assert not any(f"q{i:05d}" in text for text in tokenized for i in (0, 1000, 2000 - bound - 1))
    # The same work for a history a quarter as long: none of it depends on the turns beyond the bound.
    shorter, *_ = chat_work(chat_model, monkeypatch, 500)
    assert [len(t) for t in shorter] == [len(t) for t in tokenized]


def test_side_by_side_models_keep_their_own_history(chat_model):
    from alpaca_rlhf.inference.llama_chatbot_gradio import make_chat_fn
    chat = make_chat_fn([chat_model, chat_model])
    earlier = [{"role": "user", "content": "only in the first"}, {"role": "assistant", "content": "ok"}]
    *_, (box, first, second) = chat("hi", earlier, [], 4, False, 0.7, 0.9, 0, 1, 1.0)
    assert box == "" and len(first) == 4 and len(second) == 2
    assert first[-2]["content"] == second[-2]["content"] == "hi" and isinstance(second[-1]["content"], str)


# ----------------------------------------------------------------------------------------------- browser
class DevTools:
    """Chromium's DevTools protocol over a websocket, with the standard library only: an RFC 6455 client
    (masked text frames out, fragmented frames in), one request at a time, events ignored."""

    def __init__(self, ws_url: str, timeout: float = 30):
        url = urllib.parse.urlparse(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.next_id = 0

    def _recv_exact(self, n: int) -> bytes:
        buf = io.BytesIO()
        while buf.tell() < n:
            chunk = self.sock.recv(n - buf.tell())
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            buf.write(chunk)
        return buf.getvalue()

    def _send(self, opcode: int, payload: bytes):
        mask = os.urandom(4)
        n = len(payload)
        length = bytes([0x80 | n]) if n < 126 else (struct.pack("!BH", 0x80 | 126, n) if n < 1 << 16
                                                    else struct.pack("!BQ", 0x80 | 127, n))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode]) + length + mask + masked)

    def _recv_message(self) -> str:
        parts = []
        while True:
            first, second = self._recv_exact(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._recv_exact(8))[0]
            payload = self._recv_exact(n)
            opcode = first & 0x0F
            if opcode == 0x9:  # ping
                self._send(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the websocket")
            parts.append(payload)
            if first & 0x80:  # FIN: the message is complete
                return b"".join(parts).decode()

    def call(self, method: str, **params):
        self.next_id += 1
        self._send(0x1, json.dumps({"id": self.next_id, "method": method, "params": params}).encode())
        while True:
            reply = json.loads(self._recv_message())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def eval(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")

    def close(self):
        self.sock.close()


def start_chromium(url: str, profile: str):
    """Headless chromium showing `url`, with a DevTools port it picks itself (written to the profile)."""
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = os.path.join(profile, "DevToolsActivePort")
    deadline = time.time() + 30
    while not (os.path.exists(port_file) and open(port_file).read().strip()):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"chromium did not start (exit code {proc.poll()})")
        time.sleep(0.1)
    port = int(open(port_file).read().split()[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
        pages = [t for t in json.load(r) if t["type"] == "page"]
    return proc, DevTools(pages[0]["webSocketDebuggerUrl"])


def stop_chromium(proc, devtools):
    try:
        devtools.call("Browser.close")
    except (OSError, ConnectionError, RuntimeError):
        pass  # it may close the socket before answering
    devtools.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                    reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
def test_chat_in_a_headless_browser(app, tmp_path):
    proc, page = start_chromium(app, str(tmp_path / "profile"))
    try:
        box = "document.querySelector('#message textarea')"
        page.wait_for(f"!!{box}", 40, "the message box")
        page.eval(f"{box}.focus()")
        page.call("Input.insertText", text="Hello, who are you?")
        for kind in ("keyDown", "keyUp"):  # a real Enter key press, as a user submits
            page.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))
        bot = "[...document.querySelectorAll('#chatbot-0 .message.bot')].map(e => e.innerText.trim())"
        user = "[...document.querySelectorAll('#chatbot-0 .message.user')].map(e => e.innerText.trim())"
        page.wait_for(f"{bot}.length === 1 && {bot}[0].length > 0", 40, "an answer in the chat")
        assert page.eval(user) == ["Hello, who are you?"]
        time.sleep(0.5)  # the last streamed tokens
        shot = tmp_path / "chat.png"
        shot.write_bytes(base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]))
    finally:
        stop_chromium(proc, page)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# ----------------------------------------------------------------------------------------------- scripts
def _env():
    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def test_app_script_reports_a_bad_path(tmp_path):
    proc = subprocess.run(["sh", "run_inference.sh", "0", "alpaca_rlhf/inference/llama_chatbot_gradio.py",
                           "--path", str(tmp_path / "missing")], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model directory {tmp_path / 'missing'} does not exist"]


@pytest.mark.parametrize("flag", ["--max_queue", "--concurrency_limit"])
def test_app_refuses_a_queue_bound_below_one_before_loading(flag, micro_model_dir, capsys):
    from alpaca_rlhf.inference.llama_chatbot_gradio import main
    assert main(["--path", micro_model_dir, flag, "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {flag} must be at least 1, got 0"]


def test_app_defaults_bind_this_machine_only_with_a_bounded_queue():
    from alpaca_rlhf.inference.llama_chatbot_gradio import DEFAULT_MAX_QUEUE, parse_args
    args = parse_args(["--path", "model"])
    assert args.server_name == "127.0.0.1" and not args.share and args.max_queue == DEFAULT_MAX_QUEUE >= 1


def test_terminal_chat_with_piped_stdin(micro_model_dir):
    proc = subprocess.run([sys.executable, "-m", "alpaca_rlhf.inference.chat", "--path", micro_model_dir,
                           "--max_new_tokens", "6"], input="hello\n/clear\nagain\n", cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("Assistant:") for line in lines) == 2 and "(conversation cleared)" in lines
