"""tga/safety/chat.py

The conversation front-end behind `tga chat`: one question about an image (or text only) answered with the
tokens streamed to the terminal by transformers' `TextStreamer`, an interactive loop of such questions, and
optional retrieval of a caption-corpus text for the image (a `tga.retrieval` index folder) that the model
sees as `Retrieved Text:` in the prompt, the way TGA training presents it. With an inference-time defence
(`tga.defense`) the defended answer is printed whole once it is final, since a defence may generate several times.
`StreamedAnswer` is the same generation with the decoded text handed out piece by piece to another front-end
(`tga serve`) instead of the terminal.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image

from tga.errors import ConfigError

Retriever = Callable[[Image.Image], str]
EXIT_WORDS = ("exit", "quit", ":q")


def make_retriever(index: Any, embedder: Any) -> Retriever:
    """Top-1 corpus text for an image, from a `tga.retrieval.CaptionIndex` and the embedder that built it."""

    def retrieve(image: Image.Image) -> str:
        hits = index.search(embedder.embed_images([image]), 1)[0]
        if not hits:
            raise ConfigError("the retrieval index returned no text (empty corpus?)")
        return hits[0][0]

    return retrieve


def load_retriever(index_dir: str, *, device: str = "cpu", model_config: str | None = None) -> Retriever:
    """Load a `tga retrieve --index_path` folder and rebuild the embedder recorded in its metadata.

    Args:
        index_dir: the index folder.
        device: torch device for the embedder.
        model_config: open_clip JSON config, for custom architectures registered at index time.

    Returns:
        A function image -> retrieved text.
    """
    try:
        from tga.retrieval import CaptionIndex, build_embedder
    except ImportError as error:
        raise ConfigError("--retrieve: retrieval index support requires tga.retrieval") from error
    if not os.path.isfile(os.path.join(index_dir, "meta.json")):
        raise ConfigError(f"--retrieve: {index_dir} is not a retrieval index folder (no meta.json)")
    index = CaptionIndex.load(index_dir)
    source = index.meta.get("source", {}).get("embedder", {})
    if "backend" not in source or "model" not in source:
        raise ConfigError(f"--retrieve: {index_dir}/meta.json does not record the embedder that built the index")
    pretrained = source.get("pretrained")
    embedder = build_embedder(
        source["backend"],
        source["model"],
        pretrained=None if pretrained in (None, "None") else pretrained,
        device=device,
        model_config=model_config,
    )
    return make_retriever(index, embedder)


def answer(
    chat: Any,
    image: Image.Image | None,
    question: str,
    *,
    max_new_tokens: int = 256,
    retriever: Retriever | None = None,
    stream: bool = True,
    defense: Callable[[list[Image.Image | None], list[str]], list[Any]] | None = None,
) -> str:
    """Answer one question, streaming the tokens to stdout.

    Args:
        chat: a `tga.inference.ChatModel`.
        image: the image, or None for a text-only question.
        question: the user's question.
        max_new_tokens: answer length limit.
        retriever: optional image -> retrieved text (needs an image).
        stream: print tokens as they are generated.
        defense: an inference-time defence over `chat` (`tga.defense.dispatch.build_defense`); its final answer is
            printed when it is ready (not with `retriever`).

    Returns:
        The full answer.
    """
    if defense is not None:
        if retriever is not None:
            raise ConfigError("--retrieve and --defense cannot be combined (a defence builds its own prompts)")
        text = defense([image], [question])[0].text
        if stream:
            print(text, flush=True)
        return text
    from transformers import TextStreamer

    retrieved = retriever(image) if retriever is not None and image is not None else None
    streamer = TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    return chat.generate([image], [question], max_new_tokens=max_new_tokens, retrieved=[retrieved], streamer=streamer)[
        0
    ]


class StreamedAnswer:
    """One undefended answer generated in a worker thread by the call `answer` makes (`ChatModel.generate_usage`,
    greedy), its text handed out as it is decoded: iterate for the pieces, then read `usage` (the final text, stripped
    as `answer` returns it, and its tokens). An error in generation is raised by the iteration, not lost in the thread.
    """

    def __init__(self, chat: Any, image: Image.Image | None, question: str, *, max_new_tokens: int = 256) -> None:
        from transformers import TextIteratorStreamer

        self._streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._result: list[Any] = []
        self._error: list[BaseException] = []

        def run() -> None:
            try:
                self._result.extend(chat.generate_usage([image], [question], max_new_tokens=max_new_tokens,
                                                        streamer=self._streamer))
            except BaseException as error:  # noqa: BLE001 - handed to the reading thread, which raises it
                self._error.append(error)
                self._streamer.end()  # the reader would otherwise wait for pieces forever

        self._thread = threading.Thread(target=run, name="tga-answer", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        try:
            for piece in self._streamer:
                if piece:
                    yield piece
        finally:  # a reader that stops early (a closed page) still waits for the model to be free again
            self._thread.join()
        if self._error:
            raise self._error[0]

    @property
    def usage(self) -> Any:
        """The `tga.inference.Usage` of the answer (after the iteration has finished)."""
        self._thread.join()
        if self._error:
            raise self._error[0]
        return self._result[0]


def interactive(
    chat: Any,
    image: Image.Image | None,
    *,
    max_new_tokens: int = 256,
    retriever: Retriever | None = None,
    read: Callable[[str], str] = input,
    defense: Callable[[list[Image.Image | None], list[str]], list[Any]] | None = None,
) -> int:
    """Ask questions about one image until EOF or an exit word; each question is a fresh single turn.

    Returns:
        How many questions were answered.
    """
    answered = 0
    while True:
        try:
            question = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return answered
        if question.lower() in EXIT_WORDS:
            return answered
        if not question:
            continue
        print("model> ", end="", flush=True)
        answer(chat, image, question, max_new_tokens=max_new_tokens, retriever=retriever, defense=defense)
        answered += 1
