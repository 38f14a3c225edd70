"""The web page of `soragen serve`, in Gradio: a form with the model's defaults, Generate and Cancel,
the video with its MP4 to download, and the gallery of this server's earlier videos. What a request
does is soragen.cli.studio's; this module only lays it out and wires the events.

Only soragen.cli.serve imports this module, once it has found Gradio (`pip install soragen[serve]`).
(No `from __future__ import annotations` here: Gradio reads the handlers' annotations, gr.Request and
gr.SelectData, as classes.)
"""

import sys
import threading
from dataclasses import dataclass, field

import gradio as gr

from soragen.cli.studio import STAGES, Cancelled, Request, Studio, caption
from soragen.core.errors import SoragenError

SAMPLERS = ["dpm++", "unipc", "euler", "ddim"]
FIELDS = ["prompt", "negative_prompt", "frames", "height", "width", "steps", "guidance", "sampler", "seed"]
CSS = "#status { min-height: 2em; }"


@dataclass
class Run:
    """A session's run in progress: Cancel sets `stop`, the run sets `done` with its `message`."""

    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    message: str = ""


class Page:
    """The Blocks of one server: components by name, and the events' handlers."""

    def __init__(self, studio: Studio, title: str):
        self.studio, self.title = studio, title
        self.running: dict[str, Run] = {}  # session -> its run in progress
        self.c = {}  # the components, by name

    # ---- layout ----------------------------------------------------------------------------------
    def build(self):
        d = self.studio.defaults()
        # Gradio serves copies of the videos from its temporary folder: the ones a day old go, hourly,
        # so that a server left running does not fill the disk (the videos in --out stay)
        with gr.Blocks(title="soragen", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
            gr.Markdown(f"## soragen\n{self.title}")
            with gr.Row():
                with gr.Column(scale=1):
                    self._form(d)
                with gr.Column(scale=1):
                    self.c["video"] = gr.Video(label="Video", elem_id="video", interactive=False, autoplay=True,
                                               loop=True, buttons=["download"], height=400)
                    self.c["status"] = gr.Markdown("", elem_id="status")
                    self.c["download"] = gr.File(label="MP4", elem_id="download", interactive=False)
            self.c["gallery"] = gr.Gallery(label="Earlier videos, newest first: click one to put its settings back "
                                           "in the form", elem_id="gallery", columns=6, fit_columns=False,
                                           height=260, object_fit="contain", allow_preview=False, interactive=False)
            self.c["history"] = gr.State([])
            self._wire(demo)
        return demo

    def _form(self, d: dict) -> None:
        c = self.c
        c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                 placeholder="a red ball moving right in the blue sky")
        c["negative_prompt"] = gr.Textbox(label="Negative prompt", value=d["negative_prompt"] or "",
                                          elem_id="negative_prompt")
        if self.studio.takes_image:
            c["image"] = gr.File(label="Image to start from (PNG, JPEG, WebP)", type="binary", elem_id="image",
                                 file_types=[".png", ".jpg", ".jpeg", ".webp"])
        if self.studio.pipe.model.image_inputs > 1:  # first-last-frame
            c["last_image"] = gr.File(label="Image to end at", type="binary", elem_id="last_image",
                                      file_types=[".png", ".jpg", ".jpeg", ".webp"])
        with gr.Row():
            c["frames"] = gr.Number(label="frames", value=d["frames"], precision=0, elem_id="frames")
            for name in ("height", "width"):  # a model that starts from an image: empty, the image's aspect
                c[name] = gr.Number(label=name, value=None if self.studio.takes_image else d[name], precision=0,
                                    elem_id=name, placeholder=f"{d[name]}, or the image's aspect ratio")
        with gr.Row():
            c["steps"] = gr.Number(label="steps", value=d["steps"], precision=0, elem_id="steps")
            c["guidance"] = gr.Number(label="guidance", value=d["guidance"], elem_id="guidance")
            samplers = SAMPLERS if d["sampler"] in SAMPLERS else [d["sampler"], *SAMPLERS]
            c["sampler"] = gr.Dropdown(label="sampler", choices=samplers, value=d["sampler"], elem_id="sampler")
        with gr.Row():
            c["seed"] = gr.Number(label="seed", value=0, precision=0, elem_id="seed")
            c["random_seed"] = gr.Checkbox(label="random seed (the one used is shown after)", value=True,
                                           elem_id="random_seed")
        c["loras"] = [gr.Slider(label=f"LoRA {lora.file.name}" + ("" if lora.expert == "both" else f" @{lora.expert}"),
                                minimum=min(0.0, weight), maximum=max(2.0, weight), step=0.05, value=weight,
                                elem_id=f"lora_{i}")
                      for i, (lora, weight) in enumerate(zip(self.studio.loras, d["lora_weights"]))]
        with gr.Row():
            c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate")
            c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="cancel")

    def _wire(self, demo) -> None:
        c = self.c
        inputs = {c[name] for name in FIELDS} | {c["random_seed"], *c["loras"]} | \
            {c[name] for name in ("image", "last_image") if name in c}
        results = [c["video"], c["download"], c["status"], c["gallery"], c["history"]]
        run = c["generate"].click(lambda: "", outputs=[c["status"]], queue=False, show_progress="hidden",
                                  api_visibility="private").then(
            self.generate, inputs=inputs, outputs=results, show_progress_on=[c["video"]], concurrency_limit=1,
            concurrency_id="generate", api_name="generate")
        # Gradio takes a waiting run off the queue; a running one stops at its next step (self.cancel)
        c["cancel"].click(self.cancel, outputs=[c["status"]], queue=False, cancels=[run], api_visibility="private")
        restored = [c[name] for name in FIELDS] + [c["random_seed"], *c["loras"], c["status"]]
        c["gallery"].select(self.restore, inputs=[c["history"]], outputs=restored, queue=False)
        demo.load(self.refresh, outputs=[c["gallery"], c["history"]], queue=False)

    # ---- events ----------------------------------------------------------------------------------
    def _request(self, values: dict) -> Request:
        c = self.c
        get = {name: values.get(c[name]) for name in FIELDS}
        image, last = (values.get(c[name]) if name in c else None for name in ("image", "last_image"))
        return Request(last_image=last, prompt=get["prompt"] or "", negative_prompt=get["negative_prompt"], frames=get["frames"],
                       height=get["height"], width=get["width"], steps=get["steps"], guidance=get["guidance"],
                       sampler=get["sampler"], seed=None if values.get(c["random_seed"]) else get["seed"],
                       lora_weights=[values.get(s) for s in c["loras"]], image=image)

    def generate(self, values: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio's way)
        """The Generate button: (video, MP4, status, gallery, history)."""
        session = getattr(request, "session_hash", None) or "?"
        run = self.running[session] = Run()

        def report(stage, done, total, note=""):
            progress((done, total), desc=f"{STAGES.get(stage, stage)} {done}/{total}")

        try:
            entry = self.studio.make(self._request(values), report, run.stop.is_set)
        except Exception as err:
            run.message = self._failure(err)
            return None, None, run.message, gr.skip(), gr.skip()
        finally:
            run.done.set()
            if self.running.get(session) is run:
                del self.running[session]
        path = self.studio.out / entry["file"]
        print(f"wrote {path} ({entry['seconds']}s, seed {entry['seed']})", file=sys.stderr, flush=True)
        gallery, history = self.refresh()
        status = (f"done in {entry['seconds']:.1f}s: {entry['frames']} frames, {entry['width']}x{entry['height']}, "
                  f"seed **{entry['seed']}**")
        return str(path), str(path), status, gallery, history

    @staticmethod
    def _failure(err: Exception) -> str:
        """The status line of a run that made no video: cancelled, bad settings as the CLI says them,
        or a bug (its traceback on the server's stderr)."""
        if isinstance(err, Cancelled):
            return str(err)
        if isinstance(err, SoragenError):
            return f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        import traceback
        traceback.print_exc(file=sys.stderr)
        return f"error: {type(err).__name__}: {(str(err).splitlines() or [''])[0]} (the server's log has more)"

    def cancel(self, request: gr.Request):
        """The Cancel button: this page's run stops at its next step (said once it has); a run of
        this page still waiting in the queue Gradio takes off it."""
        run = self.running.get(getattr(request, "session_hash", None) or "?")
        if run is None:
            return "nothing of yours was running (a run still waiting in the queue is taken off it)"
        run.stop.set()
        if not run.done.wait(timeout=60):
            return "cancelling: the run stops before its next step"
        return run.message or "cancelled"

    def refresh(self):
        """(gallery, history): the output folder's videos, newest first."""
        history = self.studio.history()
        return [(str(e["path"]), caption(e)) for e in history], [{k: v for k, v in e.items() if k != "path"}
                                                                 for e in history]

    def restore(self, history: list, evt: gr.SelectData):
        """A gallery item clicked: its settings into the form."""
        c = self.c
        index = getattr(evt, "index", None)
        if not isinstance(index, int) or not 0 <= index < len(history):
            return [gr.skip()] * (len(FIELDS) + 1 + len(c["loras"])) + ["that video is no longer in the history"]
        entry = history[index]
        values = [entry.get(name) for name in FIELDS] + [False]
        weights = entry.get("lora_weights") or []
        values += [weights[i] if i < len(weights) else gr.skip() for i in range(len(c["loras"]))]
        return values + [f"settings of {entry.get('file', '?').split('/')[-1]} put back in the form"]
