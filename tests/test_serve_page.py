"""The comp-serve page in a real browser: Debian's Chromium, headless, driven by Playwright through the system
executable (never `playwright install`), against a real uvicorn server on a free port of 127.0.0.1.

A generated clip is uploaded through the page's file input; the test checks what a person sees: the label and
its bars, each modality with the reason one is missing, the transcript, the face crops, the steps as they ran,
a refusal's message, and the timeline chart. The page must load nothing from anywhere but this server.
COMP_SERVE_SCREENSHOT=path also saves the screenshot of the processed clip there (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from trained_model import LABELS, look

from demo import media
from pipeline.predict import Predictor
from pipeline.serve.app import create_app
from pipeline.serve.limits import ServeLimits

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _fake_timeline(predictor, path, options=None, progress=None) -> dict:
    """A timeline of the documented shape (pipeline.timeline.predict_timeline), for the page's chart only; the
    real timeline through the API is tested in test_serve.py."""
    for step, done, total in (("decode", 1, 1), ("asr", 4, 8), ("utterances", 3, 3), ("model", 1, 1)):
        progress(step, done, total)
    present = {"present": True}
    utts = [{"start": 0.5, "end": 2.0, "transcript": "What a lovely surprise!",
             "modalities": {"audio": present, "text": present, "visual": present},
             "prediction": {"label": "happy", "probs": {"happy": 0.8, "sad": 0.2}}},
            {"start": 3.0, "end": 4.5, "transcript": "I miss her so much.",
             "modalities": {"audio": present, "text": present, "visual": {"present": False, "reason": "no-face"}},
             "prediction": {"label": "sad", "probs": {"happy": 0.3, "sad": 0.7}}},
            {"start": 5.5, "end": 7.0, "transcript": "Nobody came today.",
             "modalities": {"audio": present, "text": present, "visual": present},
             "prediction": {"label": "sad", "probs": {"happy": 0.1, "sad": 0.9}}}]
    return {"clip": str(path), "duration_s": 7.5, "utterances": utts,
            "context": {"used": False, "why": "trained on one-utterance conversations"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    import uvicorn

    predictor = Predictor.from_checkpoint(trained["run"], device="cpu")
    app = create_app(predictor, ServeLimits(), upload_parent=tmp_path_factory.mktemp("uploads"),
                     timeline=_fake_timeline)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(300):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(30)
    assert not app.state.folder.path.exists()  # the upload folder went with the server


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency (make setup)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: scripts/setup.sh installs Debian's chromium package")
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: Chromium's sandbox cannot start as root (containers, CI)
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    base, _ = server
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/")
    # a selector, not wait_for_function: polling a JS string is eval, which the page's CSP rightly forbids
    page.wait_for_selector("#model-line:has-text('classes')")
    yield page
    assert not errors, errors  # no script error on the page
    assert all(u.startswith(base) or u.startswith("data:") for u in requests), requests  # offline: this server only
    context.close()


def _upload(page, path: Path, *, timeline: bool = False) -> dict:
    """Choose `path` in the page's file input; the job the page was given (POST /jobs), or its refusal."""
    if timeline:
        page.check("#timeline")
    with page.expect_response(lambda r: "/jobs" in r.url and r.request.method == "POST") as answer:
        page.set_input_files("#file", str(path))
    return answer.value.json()


def _job(server, job: dict) -> dict:
    """What the server itself says about the job (to compare with what the page shows)."""
    import httpx

    base, _ = server
    return httpx.get(base + job["result"], timeout=30).json()


def test_page_shows_label_modalities_transcript_and_faces(page, server, tmp_path):
    clip = media.make_clip(tmp_path / "good news.mp4", text="I got the job today, I can hardly believe it!",
                           image=look("happy", 0))
    job = _upload(page, clip)
    page.wait_for_selector("#result:not([hidden])", timeout=180_000)
    said = _job(server, job)["result"]
    label = page.text_content("#label")
    assert label == said["prediction"]["label"] and label in LABELS
    bars = page.query_selector_all("#probs .row")
    assert sorted(b.get_attribute("data-label") for b in bars) == sorted(LABELS)
    assert bars[0].get_attribute("data-label") == label and "best" in bars[0].get_attribute("class")
    shown = {r.get_attribute("data-modality"): r.query_selector("td:nth-child(2)").text_content()
             for r in page.query_selector_all("#modalities tbody tr")}
    assert shown == {"audio": "yes", "text": "yes", "visual": "yes"}
    assert page.text_content("#transcript") == said["transcript"] and said["transcript"].strip()
    assert len(page.query_selector_all("#faces img")) >= 1
    steps = [li.text_content() for li in page.query_selector_all("#steps li")]
    assert {"decode", "speech recognition", "audio", "text", "faces", "model"} <= set(steps)
    assert page.text_content("#filename") == "good news.mp4" and page.is_hidden("#error")
    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("COMP_SERVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["COMP_SERVE_SCREENSHOT"])
    _, app = server
    assert list(app.state.folder.path.iterdir()) == []


def test_page_says_why_a_modality_is_missing_and_why_a_file_is_refused(page, tmp_path):
    clip = media.make_clip(tmp_path / "silent film.mp4", audio=None, image=look("sad", 1), duration_s=1.5)
    _upload(page, clip)
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    audio = page.query_selector("#modalities tr[data-modality=audio]")
    assert audio.query_selector("td:nth-child(2)").text_content() == "no"
    assert audio.query_selector(".reason").text_content() == "no-audio-stream"
    assert page.text_content("#transcript") == "(no transcript)"
    notes = tmp_path / "notes.txt"
    notes.write_text("not a clip\n" * 20)
    _upload(page, notes)
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    message = page.text_content("#error")
    assert message.startswith("415:") and "notes.txt" in message and "not a media file" in message
    assert page.is_hidden("#result")


def test_page_draws_the_timeline_of_a_recording(page, tmp_path):
    clip = media.make_clip(tmp_path / "talk.mp4", audio=None, image=look("happy", 0), duration_s=1.0)
    _upload(page, clip, timeline=True)
    page.wait_for_selector("#timeline-result:not([hidden])", timeout=60_000)
    assert len(page.query_selector_all("#timeline-chart polyline")) == len(LABELS)  # one line per class
    rows = page.query_selector_all("#utterances tbody tr")
    assert [r.query_selector("td:nth-child(4)").text_content() for r in rows] == ["happy", "sad", "sad"]
    assert "visual: no-face" in rows[1].text_content()
    assert "no visual" in page.text_content("#timeline-chart")  # the missing modality is marked on the chart
    assert "3 utterances" in page.text_content("#timeline-note")
    assert "no conversation context" in page.text_content("#timeline-note")
