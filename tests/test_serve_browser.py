"""`tga serve` in a real browser: headless Chromium opens the page, uploads one of the demo world's toxic scenes,
submits a request and reads every column's answer and verdict, which must be `tga chat`'s greedy answers and the
keyword judge's verdicts on them; the page is photographed. Skipped, saying why, only where Chromium or selenium is
missing (CI installs chromium and chromium-driver: .ci/run)."""

from __future__ import annotations

import pytest
from PIL import Image
from serve_parts import NEW_TOKENS, REQUEST, serve_args, tiny_model_folders

from tga.safety.judge import KeywordJudge
from tga.serve.browser import answer, ask, chromium, pick_example, requested, unavailable
from tga.train.distributed import free_port

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no headless browser: {unavailable()}")



@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """`tga serve` on two tiny models, no defence and AdaShield, with the tiny demo world's scenes as examples."""
    from tga.demo.assets import build_assets
    from tga.serve.app import Server
    from tga.serve.examples import load_examples
    from tga.serve.loading import build_playground

    root = tmp_path_factory.mktemp("serve_browser")
    tiny_model_folders(root)
    build_assets(str(root / "demo" / "assets"), size="tiny", seed=0)
    examples = load_examples(str(root / "demo"))
    args = serve_args("--model", f"a={root / 'a'}", "--model", f"b={root / 'b'}", "--defense", "none", "adashield",
                      "--max_new_tokens", str(NEW_TOKENS))
    playground = build_playground(args, log=lambda *_: None)
    with Server(playground, port=free_port(), examples=examples) as url:
        yield {"url": url, "playground": playground, "examples": examples}


def test_the_page_answers_in_every_column_with_its_verdict(page, tmp_path):
    from tga.safety.chat import answer

    knife = next(e for e in page["examples"] if e.label == "toxic: knife")
    shot = tmp_path / "serve.png"
    with chromium() as driver:
        status, labels, answers, verdicts = ask(driver, page["url"], knife.image, REQUEST, screenshot=str(shot))
        urls = requested(driver)
    # the page reaches nothing on the network but the server (no fonts, scripts or analytics from elsewhere);
    # chrome:// and data: URLs are the browser's own
    network = [url for url in urls if url.startswith(("http:", "https:", "ws:", "wss:"))]
    assert any(url.startswith(page["url"]) for url in network)
    assert all(url.startswith(page["url"]) for url in network), [u for u in network if not u.startswith(page["url"])]
    playground = page["playground"]
    assert status == "Answered in all 4 columns."
    assert labels == [column.label for column in playground.columns]
    image = Image.open(knife.image).convert("RGB")
    for column, shown, verdict in zip(playground.columns, answers, verdicts):
        defense = playground.defenses[column.model][column.defense]
        expected = (answer(playground.chats[column.model], image, REQUEST, max_new_tokens=NEW_TOKENS, stream=False)
                    if defense is None else defense([image], [REQUEST])[0].text)
        assert expected and shown == expected, column.label
        word = "refused" if KeywordJudge().is_refusal(expected) else "answered"
        assert verdict.startswith(f"judge keyword: {word} · refusal phrases: "), verdict
        assert " generated tokens · 1 generation · " in verdict
    with Image.open(shot) as picture:  # the whole page, not a blank or cut-off window
        assert picture.size[0] >= 1000 and picture.size[1] >= 600
        assert len(picture.convert("L").getcolors(1 << 16) or []) > 20


def test_an_example_of_the_demo_world_fills_the_page_and_is_answered(page):
    from tga.safety.chat import answer as chat_answer

    benign = next(e for e in page["examples"] if e.label.startswith("benign "))
    with chromium() as driver:
        request = pick_example(driver, page["url"], benign.label)
        status, _, answers, _ = answer(driver)
    assert request == benign.request and status == "Answered in all 4 columns."
    image = Image.open(benign.image).convert("RGB")
    chat = page["playground"].chats["a"]
    assert answers[0] == chat_answer(chat, image, benign.request, max_new_tokens=NEW_TOKENS, stream=False)
