"""tga/serve/app.py

The page of `tga serve`: a gradio Blocks app over a `tga.serve.session.Playground`. An image upload (a file, checked by
the playground, so that a bad one gets a message rather than gradio's own error), a request, and one column per model
x defence whose answer grows as it is generated, with the judge's verdict, the refusal flag and the cost beneath it.
Requests go through gradio's queue one at a time, so two pages never interleave generation. `Server` starts the app
on the loopback interface by default, with gradio's analytics off, no share link, and its uploads in a temporary
folder that is removed when the server stops. gradio is imported here only, never by `tga --help`.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
from itertools import chain
from typing import Any

from tga.errors import ConfigError
from tga.serve.examples import Example
from tga.serve.session import InputError, Playground, read_image, verdict_line

MAX_FILE_SIZE = "20mb"  # larger uploads are refused by gradio before they reach the playground
TITLE = "tga serve: the red-teaming playground"
INTRO = ("Upload an image (or pick an example below), type a request and press **Answer**: every model answers "
         "through every defence in its own column, greedily, as `tga chat` does. Under each answer: the judge's "
         "verdict, whether it opens with a refusal phrase, and what it cost.")


def build_app(playground: Playground, examples: list[Example] | None = None) -> Any:
    """The gradio Blocks app (not launched); the answering event is `/answer`: (image file, request) -> status,
    preview, each column's answer, each column's verdict line."""
    import gradio as gr

    judge_name = getattr(playground.judge, "name", "judge")
    count = len(playground.columns)

    def respond(upload: str | None, request: str | None):
        try:
            image = read_image(upload)
            states = playground.answer(image, request or "")
            first = next(states)  # the request is checked before the first state
        except InputError as error:
            yield (f"**Cannot answer:** {error}.", None, *([""] * count), *([""] * count))
            return
        preview: Any = image
        for outcome in chain([first], states):
            done = sum(state.done for state in outcome)
            status = (f"Answering… {done} of {count} columns done." if done < count
                      else "Answered in the column." if count == 1 else f"Answered in all {count} columns.")
            # the image goes to the page first and last (an API client reads the last), not with every piece
            yield (status, image if done == count else preview, *(state.text for state in outcome),
                   *(verdict_line(state, judge_name) for state in outcome))
            preview = gr.skip()

    def show(upload: str | None):
        try:
            return read_image(upload), ""
        except InputError as error:
            return None, f"**Cannot use this image:** {error}."

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="image file", file_count="single", type="filepath", elem_id="image",
                                 height=120)
                preview = gr.Image(label="the image the models see", type="pil", interactive=False, height=200,
                                   elem_id="preview")
            with gr.Column(scale=2):
                request = gr.Textbox(label="request", lines=3, elem_id="request",
                                     placeholder="e.g. Describe the image.")
                submit = gr.Button("Answer", variant="primary", elem_id="submit")
                status = gr.Markdown(elem_id="status")
        answers, verdicts = [], []
        for model in playground.chats:  # a row per model, a column per defence: the grid of the comparison
            with gr.Row(equal_height=False):
                for index, column in enumerate(playground.columns):
                    if column.model != model:
                        continue
                    with gr.Column(min_width=220):
                        gr.Markdown(f"### {column.label}", elem_id=f"label-{index}")
                        answers.append(gr.Textbox(label="answer", lines=5, interactive=False,
                                                  elem_id=f"answer-{index}"))
                        verdicts.append(gr.Markdown(elem_id=f"verdict-{index}"))
        if examples:
            gr.Examples([[e.image, e.request] for e in examples], inputs=[upload, request],
                        example_labels=[e.label for e in examples], label="examples", cache_examples=False)
        outputs = [status, preview, *answers, *verdicts]
        # the button and Enter share one queue of one: answers never run side by side
        submit.click(respond, inputs=[upload, request], outputs=outputs, api_name="answer", concurrency_limit=1,
                     concurrency_id="answer")
        request.submit(respond, inputs=[upload, request], outputs=outputs, api_visibility="private",
                       concurrency_limit=1, concurrency_id="answer")
        # the preview and its message need no model, so they do not wait in the answering queue
        upload.change(show, inputs=[upload], outputs=[preview, status], api_visibility="private",
                      concurrency_limit=None)
    return app


class Server:
    """`with Server(playground, ...) as url:` the app listening on `url` until the block ends.

    Args:
        playground: what answers.
        host: interface to listen on (127.0.0.1: this machine only).
        port: TCP port.
        examples: the page's examples.
        temp_root: where the upload folder is made (None: the system's temporary folder).
    """

    def __init__(self, playground: Playground, *, host: str = "127.0.0.1", port: int = 7860,
                 examples: list[Example] | None = None, temp_root: str | None = None) -> None:
        self.playground, self.host, self.port, self.examples = playground, host, port, examples
        self.temp_root = temp_root
        self.app: Any = None
        self.upload_dir: str | None = None
        self._saved_env: dict[str, str | None] = {}
        self._recreated: str | None = None

    def __enter__(self) -> str:
        self.upload_dir = tempfile.mkdtemp(prefix="tga-serve-", dir=self.temp_root)
        # gradio reads both from the environment only; they are put back when the server stops
        settings = {"GRADIO_TEMP_DIR": self.upload_dir, "GRADIO_ANALYTICS_ENABLED": "False"}
        self._saved_env = {key: os.environ.get(key) for key in settings}
        os.environ.update(settings)
        # A few gradio modules fix their folder when gradio is first imported: in a process that has run a server
        # before (tests), that is the earlier server's removed folder, which the app recreates; removed again below.
        fixed = getattr(sys.modules.get("gradio.route_utils"), "DEFAULT_TEMP_DIR", None)
        if fixed is not None and fixed != self.upload_dir and not os.path.exists(fixed):
            self._recreated = fixed
        try:
            self.app = build_app(self.playground, self.examples)
            self.app.queue(default_concurrency_limit=1)
            _, url, _ = self.app.launch(server_name=self.host, server_port=self.port, share=False,
                                        prevent_thread_lock=True, quiet=True, show_error=False,
                                        max_file_size=MAX_FILE_SIZE, inbrowser=False, ssr_mode=False,
                                        mcp_server=False, pwa=False, enable_monitoring=False)
        except OSError as error:  # the port is taken, or the host is not an address of this machine
            self._cleanup()
            raise ConfigError(f"cannot listen on --host {self.host} --port {self.port}: another program may be using "
                              "the port (choose another --port), or the host is not this machine's") from error
        except BaseException:
            self._cleanup()
            raise
        return url

    def wait(self) -> None:
        """Serve until Ctrl-C or SIGTERM; either ends the `with` block normally, so the upload folder is removed."""
        stop = threading.Event()
        previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(0.5):
                pass
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def __exit__(self, *exc: object) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self.app is not None:
            self.app.close(verbose=False)
        for folder in (self.upload_dir, self._recreated):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
