"""soragen serve, driven from a real headless browser: `soragen serve` runs as a process on a free
port with the default model, and Debian's chromium (through Playwright) uses the page as a person
would: types a prompt, sets 8 frames, clicks Generate, downloads the MP4, cancels a long run, clicks a
gallery item, and submits 0 frames. Then a load test: 20 requests from 4 clients (Gradio's own
Python client) queue, all finish in the order they came, and the server's memory stays flat.

Without chromium (or Playwright, or Gradio) the test skips, unless SORAGEN_REQUIRE_BROWSER=1 (.ci/run
sets it) says the browser must be there: then it fails. With SORAGEN_SERVE_SCREENSHOT=PATH it also
saves its screenshot of the page after the first video there (docs/serve.png is made so).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli, free_port
from soragen.io.video import read_video

pytestmark = pytest.mark.slow
PROMPT = "a red ball moving right in the blue sky"
STARTUP_SECONDS = 180
VIDEO_SECONDS = 180


def _needed(what: str):
    if os.environ.get("SORAGEN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SORAGEN_REQUIRE_BROWSER=1 but {what}")
    pytest.skip(what)


def chromium() -> str:
    path = os.environ.get("SORAGEN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _needed("no chromium here (apt-get install chromium)")
    for module in ("gradio", "playwright"):
        try:
            __import__(module)
        except ImportError:
            _needed(f"{module} is not installed (pip install -e '.[test]')")
    return path


class Serving:
    """`soragen serve *options` on a free port, its output and Gradio's copies in `folder`, started
    now; `ready()` waits for its page and gives (url, output folder, the process)."""

    def __init__(self, folder: Path, *options):
        self.out, port = folder / "out", free_port()
        self.log = open(folder / "server.log", "w+")
        env = {**os.environ, "COLUMNS": "200", "GRADIO_TEMP_DIR": str(folder / "gradio")}  # its copies: ours to drop
        self.process = subprocess.Popen([sys.executable, "-m", "soragen", "serve", "--port", str(port), "--out",
                                         str(self.out), *map(str, options)], stdout=self.log, stderr=subprocess.STDOUT,
                                        env=env)
        self.url, self.deadline = f"http://127.0.0.1:{port}/", time.monotonic() + STARTUP_SECONDS

    def ready(self):
        while True:
            if self.process.poll() is not None:
                self.log.seek(0)
                pytest.fail(f"soragen serve exited with {self.process.returncode}: {self.log.read()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    if answer.status == 200:
                        return self.url, self.out, self.process
            except OSError:
                pass
            if time.monotonic() > self.deadline:
                self.process.kill()
                pytest.fail(f"soragen serve did not answer within {STARTUP_SECONDS}s")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


USER, PASSWORD = "alice", "s3cret:with:colons"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers of this module, started together (a start is mostly one core's imports): the
    default model; and a tiny random model of Wan 2.2 TI2V-5B's architecture, which takes an image,
    behind a password."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        _needed("gradio is not installed (pip install -e '.[test]')")
    from soragen.tools.tiny_wan import tiny_pipeline
    ti2v = tmp_path_factory.mktemp("ti2v")
    tiny_pipeline(ti2v=True).save_pretrained(ti2v / "model")
    started = {"default": Serving(tmp_path_factory.mktemp("serve")),
               "ti2v": Serving(ti2v, "--model", ti2v / "model", "--auth", f"{USER}:{PASSWORD}")}
    yield started
    for serving in started.values():
        serving.stop()


@pytest.fixture(scope="module")
def server(servers):
    """The default model."""
    return servers["default"].ready()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True)
        yield browser
        browser.close()


def open_page(browser, url: str):
    tab = browser.new_page(viewport={"width": 1280, "height": 1100}, accept_downloads=True)
    tab.set_default_timeout(30_000)
    tab.goto(url)
    tab.wait_for_selector("#generate")
    return tab


@pytest.fixture
def page(server, browser):
    tab = open_page(browser, server[0])
    yield tab
    tab.close()


def status_shows(page, text: str, timeout: float = VIDEO_SECONDS) -> str:
    page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text,
                           timeout=timeout * 1000)
    return page.inner_text("#status").strip()


def set_number(page, name: str, value) -> None:
    page.locator(f"#{name} input").fill(str(value))


def test_the_page_makes_a_video_restores_settings_and_survives_bad_ones(server, page, tmp_path, capfd):
    url, out, process = server
    # the model's defaults are in the form
    assert page.locator("#frames input").input_value() == "16" and page.locator("#steps input").input_value() == "10"
    assert page.locator("#image").count() == 0  # a model that makes videos from text alone: no image input

    # a prompt, 8 frames, Generate: the video plays, and its MP4 downloads
    page.locator("#prompt textarea").fill(PROMPT)
    set_number(page, "frames", 8)
    page.locator("#generate").click()
    status = status_shows(page, "done in")
    seed = int(re.search(r"seed (\d+)", status).group(1))  # random, and shown
    assert "8 frames, 64x64" in status
    page.wait_for_function("() => { const v = document.querySelector('#video video'); "
                           "return v && v.readyState >= 2 && v.videoWidth === 64 && v.videoHeight === 64; }",
                           timeout=60_000)  # decoded by the browser: it plays
    with page.expect_download() as download:
        page.locator("#download a").first.click()
    saved = tmp_path / "downloaded.mp4"
    download.value.save_as(saved)
    frames, fps = read_video(saved)
    assert frames.shape == (8, 64, 64, 3) and fps == 8
    assert frames.std() > 1  # a picture, not a flat fill
    page.wait_for_selector("#gallery button.thumbnail-item")
    if os.environ.get("SORAGEN_SERVE_SCREENSHOT"):
        page.screenshot(path=os.environ["SORAGEN_SERVE_SCREENSHOT"])

    # Cancel stops a long run between steps: no video, nothing new in the gallery
    set_number(page, "steps", 1000)
    page.locator("#generate").click()
    page.wait_for_function("() => /denoising \\d+\\/1000/.test(document.querySelector('#video').innerText)",
                           timeout=60_000)
    page.locator("#cancel").click()
    assert re.search(r"cancelled while denoising \(\d+/1000 done\)", status_shows(page, "cancelled while", 60))
    assert page.locator("#gallery button.thumbnail-item").count() == 1

    # other settings in the form; clicking the gallery's video puts its own back
    page.locator("#prompt textarea").fill("a blue square")
    set_number(page, "frames", 4)
    set_number(page, "steps", 3)
    page.locator("#gallery button.thumbnail-item").first.click()
    status_shows(page, "put back in the form", 30)
    assert page.locator("#prompt textarea").input_value() == PROMPT
    assert page.locator("#frames input").input_value() == "8"
    assert page.locator("#steps input").input_value() == "10"
    assert page.locator("#seed input").input_value() == str(seed)
    assert not page.locator("#random_seed input").is_checked()

    # 0 frames: the CLI's one-line message on the page, and the server goes on serving
    rc = cli("generate", PROMPT, "--frames", 0, "--out", tmp_path / "x.mp4")
    line = assert_one_line_error(capfd.readouterr(), 2, rc, "--frames")
    set_number(page, "frames", 0)
    page.locator("#generate").click()
    assert status_shows(page, "error:", 60) == line
    assert process.poll() is None
    set_number(page, "frames", 8)
    page.locator("#generate").click()
    status = status_shows(page, "done in")
    assert f"seed {seed}" in status  # the restored seed, no longer random
    page.wait_for_function("() => document.querySelectorAll('#gallery button.thumbnail-item').length === 2")
    videos = sorted((out / "videos").iterdir())
    assert len(videos) == 2 and all(read_video(v)[0].shape == (8, 64, 64, 3) for v in videos)
    # the same settings and seed: the same frames as the first video
    assert (read_video(videos[0])[0] == read_video(videos[1])[0]).all()


def test_a_second_page_waits_in_the_queue_and_cancel_takes_it_off(server, browser):
    url, out, process = server
    first, second = open_page(browser, url), open_page(browser, url)
    videos = sorted((out / "videos").iterdir()) if (out / "videos").exists() else []
    for tab, steps in ((first, 1000), (second, 10)):
        tab.locator("#prompt textarea").fill(f"{steps} steps")
        set_number(tab, "frames", 8)
        set_number(tab, "steps", steps)
    first.locator("#generate").click()
    first.wait_for_function("() => /denoising \\d+\\/1000/.test(document.querySelector('#video').innerText)",
                            timeout=60_000)
    second.locator("#generate").click()
    second.wait_for_function("() => document.querySelector('#video').innerText.includes('queue: 1/1')")  # shown
    second.locator("#cancel").click()
    status_shows(second, "taken off", 30)
    first.locator("#cancel").click()
    status_shows(first, "cancelled while denoising", 60)
    second.wait_for_timeout(2000)  # time for a run that was not taken off the queue to start
    assert sorted((out / "videos").iterdir()) == videos  # neither made a video
    second.locator("#generate").click()  # and the server goes on
    status_shows(second, "done in")
    assert len(list((out / "videos").iterdir())) == len(videos) + 1
    first.close()
    second.close()


def test_no_request_reads_a_path_the_page_did_not_make(server, page):
    url, out, _ = server
    for path in ("/etc/hostname", str(out / "history.jsonl"), str(Path(__file__).resolve())):
        answer = page.request.get(f"{url}gradio_api/file={path}")
        assert answer.status in (403, 404), (path, answer.status)
    # the generate endpoint takes no path: its inputs are the form's values, none of them a file
    info = page.request.get(f"{url}gradio_api/info").json()
    inputs = info["named_endpoints"]["/generate"]["parameters"]
    assert inputs and not any("file" in str(p.get("component", "")).lower() for p in inputs)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def client_temp(tmp_path, monkeypatch):
    """Gradio's client leaves an empty folder in the temporary directory for each file it downloads: in
    the test's, not in /tmp."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_twenty_requests_from_four_clients_all_finish_in_order(server, tmp_path, client_temp):
    """Each request is submitted once the one before it is in the queue, so the queue's order is known;
    the server must finish all 20, one at a time, in that order, with memory flat after the first."""
    from gradio_client import Client
    url, out, process = server
    if not Path(f"/proc/{process.pid}/status").exists():
        pytest.skip("no /proc to read the server's memory from")
    clients = [Client(url, verbose=False, download_files=str(tmp_path / f"client{i}")) for i in range(4)]
    before = len((out / "history.jsonl").read_text().splitlines()) if (out / "history.jsonl").exists() else 0
    jobs, queue_sizes, memory = [], [], []
    for k in range(20):
        # prompt, negative prompt, frames, height, width, steps, guidance, sampler, seed, random seed
        job = clients[k % 4].submit(f"load {k}", "", 8, 32, 32, 2, 3.5, "dpm++", k, False, api_name="/generate")
        deadline = time.monotonic() + 60
        while (status := job.status()).code.name == "STARTING" and time.monotonic() < deadline:
            time.sleep(0.02)
        queue_sizes.append(status.queue_size or 0)
        jobs.append(job)
        if k == 0:
            job.result(timeout=VIDEO_SECONDS)  # the first video made: memory from here on stays flat
            memory.append(rss_kib(process.pid))
    for k, job in enumerate(jobs):
        video, mp4, status, *_ = job.result(timeout=VIDEO_SECONDS)
        assert status.startswith("done") and f"seed **{k}**" in status, (k, status)
        assert read_video(video)[0].shape == (8, 32, 32, 3)
    memory.append(rss_kib(process.pid))
    assert max(queue_sizes) >= 2  # they did wait in a queue, whose length the clients were told
    lines = (out / "history.jsonl").read_text().splitlines()[before:]
    import json
    assert [json.loads(line)["prompt"] for line in lines] == [f"load {k}" for k in range(20)]  # all, in order
    print(f"server RSS after the first video {memory[0]} KiB, after all 20 {memory[-1]} KiB")
    assert memory[-1] <= 1.1 * memory[0], f"RSS grew from {memory[0]} KiB to {memory[-1]} KiB"


# ---- a model that starts from an image: uploads, and requests that name a path ------------------

@pytest.fixture(scope="module")
def ti2v_server(servers):
    return servers["ti2v"].ready()


def logged_in(url: str, password: str = PASSWORD):
    """A urllib opener holding the session cookie of a login (HTTPError 4xx where it is refused)."""
    import http.cookiejar
    import urllib.parse
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    opener.open(f"{url}login", data=urllib.parse.urlencode({"username": USER, "password": password}).encode(),
                timeout=30)
    return opener


def test_auth_keeps_out_whoever_lacks_the_password(ti2v_server):
    import urllib.error
    url = ti2v_server[0]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}gradio_api/info", timeout=30)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as refused:
        logged_in(url, "wrong")
    assert 400 <= refused.value.code < 500
    with logged_in(url).open(f"{url}gradio_api/info", timeout=30) as answer:
        assert answer.status == 200


def test_an_upload_makes_a_video_and_a_request_naming_a_server_file_is_refused(ti2v_server, tmp_path,
                                                                             client_temp):
    import json

    import numpy as np
    from gradio_client import Client, handle_file
    from PIL import Image
    url, out, process = ti2v_server
    picture = tmp_path / "start.png"
    Image.fromarray(np.full((40, 40, 3), 180, np.uint8)).save(picture)
    settings = [5, 32, 32, 2, 5.0, "unipc", 1, False]  # frames, height, width, steps, guidance, sampler, seed, random
    client = Client(url, verbose=False, download_files=str(tmp_path / "client"), auth=(USER, PASSWORD))
    opener = logged_in(url)
    video, _, status, *_ = client.predict("a corgi", "", handle_file(str(picture)), *settings, api_name="/generate")
    assert status.startswith("done") and read_video(video)[0].shape == (5, 32, 32, 3)
    made = sorted((out / "videos").iterdir())
    for path in ("/etc/hostname", str(out / "history.jsonl"), str(made[0])):
        request = {"data": ["a corgi", "", {"path": path, "meta": {"_type": "gradio.FileData"}}, *settings]}
        call = urllib.request.Request(f"{url}gradio_api/call/generate", data=json.dumps(request).encode(),
                                      headers={"Content-Type": "application/json"})
        with opener.open(call, timeout=30) as answer:
            event = json.load(answer)["event_id"]
        with opener.open(f"{url}gradio_api/call/generate/{event}", timeout=60) as answer:
            events = answer.read().decode()
        assert events.startswith("event: error"), (path, events[:300])
    assert sorted((out / "videos").iterdir()) == made  # no video from a file the request named
    assert process.poll() is None
