"""tga/serve/session.py

The answering behind `tga serve`, testable without gradio. A `Playground` holds the models (loaded once) and, for each
model x defence, a column; `answer(image, request)` checks the input, then answers in every column in turn and yields
the state of all columns after each decoded piece, so that a page can show every answer as it grows. An undefended
column streams its tokens from the call `tga chat` makes (`tga.safety.chat.StreamedAnswer`); a defended column is
answered by the same defence object `tga chat --defense` builds, over a `StreamingChat` that shows each of the
defence's generations as it is decoded ("ecso, pass 2: ..."), and then the defence's final answer. Each final answer
carries the judge's verdict, the refusal-phrase flag and its cost (tokens, generate calls, seconds). Bad input (not an image, truncated, too large, animated, an empty or too long request)
raises `InputError`, whose message the page shows.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from tga.errors import DataError, TGAError
from tga.image_io import open_image
from tga.safety.judge import KeywordJudge

MAX_PIXELS = 25_000_000  # the processor shrinks every image to the tower's size; larger files only cost memory
MAX_REQUEST_CHARS = 100_000  # longer text is refused before it is tokenised (no model here reads that much)
VERDICT_WORDS = {"keyword": ("refused", "answered"), "llm": ("safe", "unsafe")}  # judge name -> (True, False)


class InputError(TGAError):
    """The page's input cannot be answered; the message says what is wrong and is shown in the page."""


@dataclass(frozen=True)
class Column:
    """One model answering through one defence ("none": as asked)."""

    model: str
    defense: str

    @property
    def label(self) -> str:
        return f"{self.model} · {self.defense}"


@dataclass(frozen=True)
class Outcome:
    """A column's state: the answer so far and, once `done`, its verdicts and cost (or the error that stopped it)."""

    text: str = ""
    done: bool = False
    refused: bool | None = None  # refusal phrases at the start of the answer (tga.safety.judge.KeywordJudge)
    verdict: bool | None = None  # the judge's verdict: True = refused / safe
    cost: Any = None  # tga.defense.base.Cost
    seconds: float | None = None
    error: str | None = None


def read_image(path: str | None) -> Image.Image | None:
    """The uploaded file as an RGB image (None: no upload), or an `InputError` saying why it cannot be one."""
    if path is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as probe:  # reads the header only: size and frames before any decoding
                size, frames = probe.size, getattr(probe, "n_frames", 1)
    except UnidentifiedImageError as error:
        raise InputError("the upload is not an image (use a PNG, JPEG, WebP or BMP file)") from error
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise InputError(f"the image is too large ({error}); the limit is {MAX_PIXELS // 1_000_000} megapixels") \
            from error
    except (OSError, ValueError, SyntaxError) as error:
        raise InputError(f"the upload cannot be read as an image ({type(error).__name__}: {error})") from error
    if frames > 1:
        raise InputError(f"the image is animated ({frames} frames); upload a still image")
    if size[0] * size[1] > MAX_PIXELS:
        raise InputError(f"the image is {size[0]}x{size[1]} pixels, {size[0] * size[1] / 1e6:.0f} megapixels; "
                         f"the limit is {MAX_PIXELS // 1_000_000}")
    try:
        return open_image(path, "upload")
    except DataError as error:
        cause = error.__cause__
        raise InputError(f"the image is truncated or damaged and cannot be decoded ({type(cause).__name__}: "
                         f"{cause})") from error


def context_length(chat: Any) -> int | None:
    """The most positions the model's LLM reads (prompt and answer), from its config; None if it does not say."""
    config = chat.model.config
    return getattr(getattr(config, "text_config", config), "max_position_embeddings", None)


class StreamingChat:
    """A `tga.inference.ChatModel` that, while `sink` is set, hands the decoded pieces of each single-request generation
    to it (None first: a new pass), so that a defence built over it (`build_defense(chat=...)`) can be watched pass by
    pass. Everything else is the model's own: the defence answers exactly as over the `ChatModel`."""

    def __init__(self, chat: Any) -> None:
        self.chat = chat
        self.sink: Callable[[str | None], None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.chat, name)

    def generate_usage(self, images: list, questions: list[str], *, max_new_tokens: int = 64,
                       retrieved: list | None = None, streamer: Any = None) -> list:
        sink = self.sink
        if sink is not None and streamer is None and len(questions) == 1:  # transformers' streamers take one row
            from transformers import TextStreamer

            class PassStreamer(TextStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                    if text:
                        sink(text)

            sink(None)
            streamer = PassStreamer(self.chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        return self.chat.generate_usage(images, questions, max_new_tokens=max_new_tokens, retrieved=retrieved,
                                        streamer=streamer)


class Playground:
    """Every model x defence, answering one (image, request) at a time.

    Args:
        chats: model name -> `tga.inference.ChatModel`, loaded once.
        defenses: model name -> {defence name -> defence over that model (`build_defense`), None for "none"}.
        judge: a `tga.safety.judge` judge with `name` and `judge(questions, answers)`.
        max_new_tokens: answer length limit of the undefended columns (the defences carry their own).
        clock: seconds, for the cost line.
    """

    def __init__(self, chats: dict[str, Any], defenses: dict[str, dict[str, Any]], judge: Any, *,
                 max_new_tokens: int = 256, clock: Callable[[], float] = time.perf_counter) -> None:
        self.chats, self.defenses, self.judge = chats, defenses, judge
        self.max_new_tokens, self.clock = max_new_tokens, clock
        self.columns = [Column(model, defense) for model in chats for defense in defenses[model]]
        self.refusals = KeywordJudge()
        # one answer at a time, whatever the front-end's queue does: CMRM hooks the shared model while it generates
        self._lock = threading.Lock()

    def check_request(self, request: str | None, image: Image.Image | None) -> str:
        """The request, or an `InputError` if it is empty or too long for a model's context."""
        request = (request or "").strip()
        if not request:
            raise InputError("the request is empty; type what to ask the models")
        if len(request) > MAX_REQUEST_CHARS:
            raise InputError(f"the request is {len(request)} characters; the limit is {MAX_REQUEST_CHARS}")
        for name, chat in self.chats.items():
            limit = context_length(chat)
            if limit is None:
                continue
            prompt = chat.prompt_tokens([image], [request])[0]
            if prompt + self.max_new_tokens > limit:
                raise InputError(f"the request is too long for model {name}: its prompt is {prompt} tokens "
                                 f"(image included), and with {self.max_new_tokens} answer tokens that exceeds the "
                                 f"model's context length of {limit}")
        return request

    def answer(self, image: Image.Image | None, request: str) -> Iterator[list[Outcome]]:
        """Answer in every column in turn (the request checked first); yields all columns' states as they change."""
        request = self.check_request(request, image)
        with self._lock:
            states = [Outcome() for _ in self.columns]
            yield list(states)
            for index, column in enumerate(self.columns):
                for state in self._column(column, image, request):
                    states[index] = state
                    yield list(states)

    def _column(self, column: Column, image: Image.Image | None, request: str) -> Iterator[Outcome]:
        from tga.defense.base import cost_of

        start = self.clock()
        text = ""
        try:
            defense = self.defenses[column.model][column.defense]
            if defense is None:
                from tga.safety.chat import StreamedAnswer

                streamed = StreamedAnswer(self.chats[column.model], image, request,
                                          max_new_tokens=self.max_new_tokens)
                for piece in streamed:
                    text += piece
                    yield Outcome(text=text)
                usage = streamed.usage
                text, cost = usage.text, cost_of([usage], usage.prompt_tokens)
            else:
                yield Outcome(text=f"({column.defense}: answering…)")
                reply = yield from self._defended(column, defense, image, request)
                text, cost = reply.text, reply.cost
            verdict = self.judge.judge([request], [text])[0]
        except Exception as error:  # noqa: BLE001 - one column's failure is shown in it; the others still answer
            yield Outcome(text=text, done=True, seconds=self.clock() - start,
                          error=f"{type(error).__name__}: {error}")
            return
        yield Outcome(text=text, done=True, refused=self.refusals.is_refusal(text), verdict=bool(verdict), cost=cost,
                      seconds=self.clock() - start)


    def _defended(self, column: Column, defense: Any, image: Image.Image | None, request: str
                  ) -> Generator[Outcome, None, Any]:
        """Run the defence in a worker thread, yielding each pass as it is decoded; returns its `Reply`."""
        chat = self.chats[column.model]
        if not isinstance(chat, StreamingChat):  # a defence over a plain model: its answer appears when final
            return defense([image], [request])[0]
        pieces: queue.Queue = queue.Queue()
        finished = object()
        replies: list[Any] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                replies.append(defense([image], [request])[0])
            except BaseException as error:  # noqa: BLE001 - raised again in the reading thread
                errors.append(error)
            finally:
                pieces.put(finished)

        chat.sink = pieces.put
        worker = threading.Thread(target=run, name="tga-defense", daemon=True)
        worker.start()
        passes, text = 0, ""
        try:
            while (piece := pieces.get()) is not finished:
                passes, text = (passes + 1, "") if piece is None else (passes, text + piece)
                yield Outcome(text=f"({column.defense}, pass {passes}) {text}")
        finally:  # a reader that stops early still waits for the model to be free again
            worker.join()
            chat.sink = None
        if errors:
            raise errors[0]
        return replies[0]


def verdict_line(outcome: Outcome, judge_name: str) -> str:
    """One line under a column's answer: the judge's verdict, the refusal flag and the cost (empty until done)."""
    if not outcome.done:
        return ""
    if outcome.error is not None:
        return f"**failed**: {outcome.error}"
    yes, no = VERDICT_WORDS.get(judge_name, ("refused", "answered"))
    cost = outcome.cost
    tokens = ("tokens not counted" if cost.prompt_tokens is None else
              f"{cost.prompt_tokens} prompt + {cost.new_tokens} generated tokens")
    calls = f"{cost.generations} generation{'s' if cost.generations != 1 else ''}"
    return (f"**judge {judge_name}: {yes if outcome.verdict else no}** · refusal phrases: "
            f"{'yes' if outcome.refused else 'no'} · {tokens} · {calls} · {outcome.seconds:.2f} s")

