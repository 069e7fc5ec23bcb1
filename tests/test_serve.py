"""`tga serve` through gradio's own client: the served answers are `tga chat`'s greedy answers for the same model,
defence, image and request; two clients at once each get their own answers, one request after the other; each kind
of bad input gets its message in the page and the server keeps answering; uploads live in a folder removed at the
end; the flags' mistakes are named; the demo world's scenes are the examples; `tga --help` does not import gradio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from PIL import Image
from serve_parts import NEW_TOKENS, REQUEST, serve_args, tiny_model_folders

from tga.cli import main
from tga.errors import ConfigError
from tga.inference import Usage
from tga.safety.judge import KeywordJudge
from tga.train.distributed import free_port

gradio_client = pytest.importorskip("gradio_client", reason="the serve extra is not installed (pip install -e '.[serve]')")

DEFENSES = ("none", "adashield")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny random VLM folders (different weights) and test images."""
    root = tmp_path_factory.mktemp("serve")
    models, assets = tiny_model_folders(root)
    images = {}
    for name, colour in (("red", (200, 10, 10)), ("blue", (10, 10, 200))):
        images[name] = str(root / f"{name}.png")
        Image.new("RGB", (32, 32), colour).save(images[name])
    return {"root": root, "models": models, "images": images, "llm": assets["llm"]}


@pytest.fixture(scope="module")
def served(tiny):
    """`tga serve` on both models with no defence and AdaShield, listening on a free loopback port."""
    from tga.serve.app import Server
    from tga.serve.loading import build_playground

    args = serve_args("--model", f"a={tiny['models']['a']}", "--model", f"b={tiny['models']['b']}",
                      "--defense", *DEFENSES, "--max_new_tokens", str(NEW_TOKENS))
    playground = build_playground(args, log=lambda *_: None)
    server = Server(playground, port=free_port())
    with server as url:
        yield {"url": url, "server": server, "playground": playground,
               "client": gradio_client.Client(url, verbose=False, download_files=False, analytics_enabled=False)}


def ask(client, image: str | None, request: str) -> tuple:
    return client.predict(gradio_client.handle_file(image) if image else None, request, api_name="/answer")


def columns(result: tuple, count: int) -> tuple[str, list[str], list[str]]:
    """(status, answers, verdict lines) of one `/answer` result."""
    return result[0], list(result[2:2 + count]), list(result[2 + count:2 + 2 * count])


def chat_answer(capsys, model: str, image: str, request: str, defense: str) -> str:
    """What `tga chat` prints for one question."""
    capsys.readouterr()
    flags = [] if defense == "none" else ["--defense", defense]
    assert main(["chat", "--model", model, "--image", image, "--max_new_tokens", str(NEW_TOKENS), *flags,
                 request]) == 0
    return capsys.readouterr().out.strip()


def test_served_answers_are_tga_chat_greedy_answers_with_verdict_and_cost(served, tiny, capsys):
    playground = served["playground"]
    labels = [column.label for column in playground.columns]
    assert labels == ["a · none", "a · adashield", "b · none", "b · adashield"]
    result = ask(served["client"], tiny["images"]["red"], REQUEST)
    status, answers, verdicts = columns(result, len(labels))
    assert status == "Answered in all 4 columns."
    assert result[1]["path"].startswith(served["server"].upload_dir)  # the image the models saw, shown back
    for column, served_answer, verdict in zip(playground.columns, answers, verdicts):
        expected = chat_answer(capsys, tiny["models"][column.model], tiny["images"]["red"], REQUEST, column.defense)
        assert expected and served_answer == expected, column.label
        flag = "yes" if KeywordJudge().is_refusal(served_answer) else "no"
        assert verdict.startswith("**judge keyword: ") and f"refusal phrases: {flag}" in verdict
        assert " generated tokens · 1 generation · " in verdict and verdict.endswith(" s")
    assert answers[0] != answers[2]  # two models, two answers: the columns are not one model shown twice


def test_a_defended_column_shows_each_pass_as_it_is_decoded_then_the_final_answer(served, tiny):
    job = served["client"].submit(gradio_client.handle_file(tiny["images"]["red"]), REQUEST, api_name="/answer")
    _, answers, _ = columns(job.result(timeout=120), 4)
    shown = [columns(update, 4)[1][1] for update in job.outputs()]  # a · adashield, state by state
    prefix = "(adashield, pass 1) "
    passes = [text[len(prefix):] for text in shown if text.startswith(prefix)]
    assert len(set(passes)) > 1  # the pass grew piece by piece
    assert all(answers[1].startswith(text.strip()) for text in passes) and shown[-1] == answers[1]


def test_ecso_passes_are_shown_in_turn_and_its_answer_is_tga_chats(tiny, capsys):
    from tga.serve.loading import build_playground

    flags = ["--defense", "ecso", "--ecso_mode", "always", "--max_new_tokens", str(NEW_TOKENS)]
    playground = build_playground(serve_args("--model", f"a={tiny['models']['a']}", *flags), log=lambda *_: None)
    shown = [states[0] for states in playground.answer(Image.open(tiny["images"]["red"]), REQUEST)]
    labels = [state.text.split(")")[0] for state in shown if state.text.startswith("(ecso, pass ")]
    assert list(dict.fromkeys(labels)) == ["(ecso, pass 1", "(ecso, pass 2"]  # the caption, then the answer
    capsys.readouterr()
    assert main(["chat", "--model", tiny["models"]["a"], "--image", tiny["images"]["red"], *flags, REQUEST]) == 0
    assert shown[-1].done and shown[-1].text == capsys.readouterr().out.strip()
    assert shown[-1].cost.generations == 2


class Recorder:
    """A ChatModel whose generate calls are recorded as start and end events (to see whether two ever overlap)."""

    def __init__(self, chat, events: list[str]) -> None:
        self.chat, self.events, self.lock = chat, events, threading.Lock()

    def __getattr__(self, name):
        return getattr(self.chat, name)

    def generate_usage(self, *args, **kwargs) -> list[Usage]:
        with self.lock:
            self.events.append("start")
        try:
            return self.chat.generate_usage(*args, **kwargs)
        finally:
            with self.lock:
                self.events.append("end")


def test_two_clients_at_once_each_get_their_own_answers_one_after_the_other(tiny):
    from tga.safety.chat import answer
    from tga.safety.loading import load_chat
    from tga.serve.app import Server
    from tga.serve.session import Playground

    events: list[str] = []
    chats = {name: Recorder(load_chat(tiny["models"][name]), events) for name in ("a", "b")}
    playground = Playground(chats, {"a": {"none": None}, "b": {"none": None}}, KeywordJudge(),
                            max_new_tokens=NEW_TOKENS)
    asks = {"red": "Describe the image.", "blue": "What colour is it?"}
    expected = {(name, colour): answer(chats[name].chat, Image.open(tiny["images"][colour]).convert("RGB"), request,
                                       max_new_tokens=NEW_TOKENS, stream=False)
                for name in chats for colour, request in asks.items()}
    events.clear()
    server = Server(playground, port=free_port())
    with server as url:
        clients = [gradio_client.Client(url, verbose=False, download_files=False, analytics_enabled=False)
                   for _ in asks]
        jobs = {colour: client.submit(gradio_client.handle_file(tiny["images"][colour]), request,
                                      api_name="/answer") for client, (colour, request) in zip(clients, asks.items())}
        results = {colour: job.result(timeout=120) for colour, job in jobs.items()}
        uploads = [name for _, _, files in os.walk(server.upload_dir) for name in files]
        assert "red.png" in uploads and "blue.png" in uploads  # uploads land in the server's own folder
        for colour, job in jobs.items():
            _, answers, _ = columns(results[colour], 2)
            assert answers == [expected[("a", colour)], expected[("b", colour)]]
            for update in job.outputs():  # every streamed state is a prefix of this client's own answers
                _, partial, _ = columns(update, 2)
                assert all(answer.startswith(text) for answer, text in zip(answers, partial))
    assert not os.path.exists(server.upload_dir)  # removed when the server stops
    assert expected[("a", "red")] != expected[("a", "blue")]  # the two clients' answers differ
    assert events == ["start", "end"] * 4  # four generations, never two at once


def write_bad_inputs(folder) -> dict[str, str]:
    """One file per kind of bad upload."""
    files = {"text": folder / "notes.png", "truncated": folder / "cut.png", "huge": folder / "huge.png",
             "bomb": folder / "bomb.png", "animated": folder / "moving.gif"}
    files["text"].write_text("this is not an image\n")
    Image.new("RGB", (64, 64), (0, 90, 200)).save(folder / "whole.png")
    whole = (folder / "whole.png").read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    Image.new("1", (6000, 5000)).save(files["huge"])  # 30 megapixels, a small file
    Image.new("1", (15000, 15000)).save(files["bomb"])  # over PIL's own decompression-bomb limit
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(files["animated"], save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {name: str(path) for name, path in files.items()}


def test_each_bad_input_gets_its_message_and_the_server_keeps_answering(served, tiny, tmp_path):
    client, count = served["client"], len(served["playground"].columns)
    files = write_bad_inputs(tmp_path)
    long_request = "please describe " * 2100  # over the tiny LLM's 4096 positions
    cases = [
        (files["text"], REQUEST, "the upload is not an image"),
        (files["truncated"], REQUEST, "the image is truncated or damaged"),
        (files["huge"], REQUEST, "the image is 6000x5000 pixels, 30 megapixels; the limit is 25"),
        (files["bomb"], REQUEST, "the image is too large"),
        (files["animated"], REQUEST, "the image is animated (2 frames)"),
        (tiny["images"]["red"], "   ", "the request is empty"),
        (tiny["images"]["red"], long_request, "exceeds the model's context length of 4096"),
    ]
    for image, request, message in cases:
        status, answers, verdicts = columns(ask(client, image, request), count)
        assert status.startswith("**Cannot answer:** ") and message in status, (image, status)
        assert answers == [""] * count and verdicts == [""] * count
    status, answers, _ = columns(ask(client, tiny["images"]["red"], REQUEST), count)
    assert status == "Answered in all 4 columns." and all(answers)


def test_a_server_path_cannot_be_passed_for_the_image(served):
    """Only uploads reach the playground: a request naming a file on the server (sent raw, as a page could) fails."""
    import httpx

    base = served["url"].rstrip("/") + "/gradio_api/call/answer"
    named = {"path": os.path.abspath(__file__), "meta": {"_type": "gradio.FileData"}}
    event = httpx.post(base, json={"data": [named, REQUEST]}, timeout=30).json()["event_id"]
    stream = httpx.get(f"{base}/{event}", timeout=60).text
    assert stream.startswith("event: error") and "Answered" not in stream


def test_a_text_only_request_is_answered_without_an_image(served, tiny, capsys):
    status, answers, _ = columns(ask(served["client"], None, "Say hello."), 4)
    assert status == "Answered in all 4 columns."
    capsys.readouterr()
    assert main(["chat", "--model", tiny["models"]["a"], "--max_new_tokens", str(NEW_TOKENS), "Say hello."]) == 0
    assert answers[0] == capsys.readouterr().out.strip()


class ScriptedJudge:
    """Calls every answer safe and remembers what it was asked."""

    name = "llm"

    def __init__(self) -> None:
        self.asked: list[tuple[list[str], list[str]]] = []

    def judge(self, questions, answers):
        self.asked.append((list(questions), list(answers)))
        return [True] * len(answers)


def test_each_final_answer_is_judged_and_its_verdict_shown(tiny):
    from tga.safety.loading import load_chat
    from tga.serve.session import Playground, verdict_line

    judge = ScriptedJudge()
    playground = Playground({"a": load_chat(tiny["models"]["a"])}, {"a": {"none": None}}, judge,
                            max_new_tokens=NEW_TOKENS)
    states = list(playground.answer(Image.open(tiny["images"]["red"]), f"  {REQUEST} "))
    final = states[-1][0]
    assert states[0][0].text == "" and not states[-2][0].done and final.done
    assert judge.asked == [([REQUEST], [final.text])]  # the stripped request and the final answer, once
    assert verdict_line(final, judge.name).startswith("**judge llm: safe** · refusal phrases: ")


def test_a_local_judge_folder_judges_the_served_answers(tiny):
    from tga.safety.judge import LLMJudge
    from tga.serve.loading import build_playground

    args = serve_args("--model", f"a={tiny['models']['a']}", "--judge", "llm", "--judge_model", tiny["llm"],
                      "--max_new_tokens", str(NEW_TOKENS))
    playground = build_playground(args, log=lambda *_: None)
    assert isinstance(playground.judge, LLMJudge)
    final = list(playground.answer(Image.open(tiny["images"]["red"]), REQUEST))[-1][0]
    assert final.verdict is LLMJudge.from_pretrained(tiny["llm"]).judge([REQUEST], [final.text])[0]


def test_serve_defaults_to_the_loopback_interface_and_names_a_taken_port(served):
    from tga.serve.app import Server

    assert serve_args("--model", "a=x").host == "127.0.0.1"
    assert served["url"].startswith("http://127.0.0.1:")
    taken = int(served["url"].rstrip("/").rsplit(":", 1)[1])
    server = Server(served["playground"], port=taken)
    with pytest.raises(ConfigError, match=f"cannot listen on --host 127.0.0.1 --port {taken}"):
        server.__enter__()
    assert not os.path.exists(server.upload_dir)


@pytest.mark.parametrize("argv, message", [
    (["--model", "a"], "is not NAME=DIR"),
    (["--model", "a=x", "--model", "a=y"], "the name `a` is given twice"),
    (["--model", "a=x", "--ecso_mode", "always"], "--ecso_mode applies to --defense ecso"),
    (["--model", "a=x", "--model", "b=y", "--defense", "cmrm", "--cmrm_file", "c.safetensors"], "names no model"),
    (["--model", "a=x", "--model", "b=y", "--defense", "cmrm", "--cmrm_file", "a=c.safetensors"],
     "gives none for b"),
    (["--model", "a=x", "--judge", "llm"], "--judge llm needs --judge_model"),
])
def test_flag_mistakes_are_named_before_any_model_loads(argv, message):
    from tga.serve.loading import build_playground

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_playground(serve_args(*argv), log=lambda *_: None)


def test_a_missing_model_folder_is_named(tmp_path):
    from tga.serve.loading import build_playground

    with pytest.raises(ConfigError, match="--model a"):
        build_playground(serve_args("--model", f"a={tmp_path / 'nothing'}"), log=lambda *_: None)


def test_the_examples_of_a_demo_run_are_its_toxic_and_benign_scenes(tmp_path):
    from tga.demo.assets import build_assets
    from tga.demo.world import TOXIC_CONCEPTS
    from tga.serve.examples import load_examples

    build_assets(str(tmp_path / "run" / "assets"), size="tiny", seed=0)
    examples = load_examples(str(tmp_path / "run"))
    toxic = [e for e in examples if e.label.startswith("toxic: ")]
    benign = [e for e in examples if e.label.startswith("benign ")]
    assert sorted(e.label for e in toxic) == ["toxic: cigarette", "toxic: gun", "toxic: knife", "toxic: skull"]
    assert all(f"/toxic_test/{e.label[7:]}/" in e.image and e.request == "Describe the image." for e in toxic)
    assert len(benign) == 4 and len({e.request for e in benign}) > 1
    assert len({e.label for e in examples}) == len(examples)  # each can be told apart in the page
    with open(tmp_path / "run" / "assets" / "world" / "scenes.jsonl", encoding="utf-8") as handle:
        toxic_scene = {scene["id"]: any(o["concept"] in TOXIC_CONCEPTS for o in scene["objects"])
                       for scene in map(json.loads, handle)}
    images = tmp_path / "run" / "assets" / "world" / "images"
    assert not any(toxic_scene[os.path.relpath(e.image, images)[: -len(".png")]] for e in benign)
    assert all(os.path.isfile(e.image) and Image.open(e.image).size == (48, 48) for e in examples)
    with pytest.raises(ConfigError, match="holds no images"):
        load_examples(str(tmp_path))


def test_the_command_serves_until_sigterm_and_leaves_nothing_behind(tiny, tmp_path):
    import queue
    import signal

    command = [os.path.join(os.path.dirname(sys.executable), "tga"), "serve", "--model", f"a={tiny['models']['a']}",
               "--port", str(free_port()), "--max_new_tokens", str(NEW_TOKENS)]
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}  # its upload folder goes under tmp_path
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)],
                     daemon=True).start()
    console = []
    try:
        while not console or "open http" not in console[-1]:
            line = lines.get(timeout=180)
            assert line is not None, "".join(console)
            console.append(line)
        url = console[-1].split("open ", 1)[1].split(" ", 1)[0]
        client = gradio_client.Client(url, verbose=False, download_files=False, analytics_enabled=False)
        assert ask(client, tiny["images"]["red"], REQUEST)[0] == "Answered in the column."
        assert len(list(tmp_path.glob("tga-serve-*"))) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    while (line := lines.get(timeout=30)) is not None:
        console.append(line)
    assert process.returncode == 0, "".join(console)
    assert not list(tmp_path.glob("tga-serve-*"))  # the upload folder went with the server
    # the console shows the work: what loads, the columns and where to open the page; no library noise
    assert [line.split(" ", 2)[:2] for line in console] == [["loading", "a"], ["tga", "serve:"], ["tga", "serve:"]]


def test_tga_help_does_not_import_gradio():
    code = "import sys; from tga.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "print('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "False", result.stderr[-2000:]
