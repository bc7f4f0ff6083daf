"""comp-serve's HTTP API with FastAPI's test client, on generated clips and the shared tiny checkpoint
(`trained`, conftest.py): the comp-predict JSON, refusals with their reasons (oversize while streaming,
too long, corrupt, no media, wrong field), the bounded queue (503 + Retry-After, never two clips in the models
at once), progress as server-sent events, and uploads that never outlive their request."""

from __future__ import annotations

import asyncio
import json
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from trained_model import LABELS, TRAIN_TEXT, look

from demo import media
from pipeline.inputs import ClipItem
from pipeline.predict import PREDICT_STEPS, Predictor
from pipeline.serve.app import create_app
from pipeline.serve.limits import ServeLimits
from pipeline.serve.uploads import UploadError, UploadFolder, display_name, receive_upload, stored_suffix

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def predictor(trained) -> Predictor:
    return Predictor.from_checkpoint(trained["run"], device="cpu")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-clips")
    out = {"noaudio": media.make_clip(root / "noaudio.mp4", audio=None, image=look("sad", 1), duration_s=1.5),
           "noface": media.make_clip(root / "noface.mp4", audio=None, face=False, duration_s=1.5),
           "long": media.make_clip(root / "long.mp4", audio="noise", face=False, duration_s=6.0),
           "corrupt": media.corrupt_file(root / "corrupt.mp4"),
           "text": root / "notes.txt"}
    out["text"].write_text("not a clip\n" * 50)
    return out


class Gated:
    """The real predictor, held at a gate, counting how many clips are inside the models at once."""

    def __init__(self, inner: Predictor) -> None:
        self.inner, self.gate = inner, threading.Event()
        self.active = self.most = self.calls = 0
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_item(self, item, **kw):
        with self._lock:
            self.active += 1
            self.calls += 1
            self.most = max(self.most, self.active)
        self.started.set()
        try:
            assert self.gate.wait(120)
            return self.inner.predict_item(item, **kw)
        finally:
            with self._lock:
                self.active -= 1


def _client(predictor, tmp_path, **limits) -> TestClient:
    app = create_app(predictor, ServeLimits(**limits), upload_parent=tmp_path, timeline=None)
    return TestClient(app, raise_server_exceptions=False)


def _post(client: TestClient, path: Path, url: str = "/predict", field: str = "file", name: str | None = None):
    with open(path, "rb") as fh:
        return client.post(url, files={field: (name or path.name, fh, "application/octet-stream")})


def _folder(client: TestClient) -> Path:
    return client.app.state.folder.path


def test_good_clip_gets_the_comp_predict_json_and_leaves_nothing(predictor, trained, tmp_path):
    clip = trained["probe"] / "complete.mp4"
    with _client(predictor, tmp_path) as client:
        folder = _folder(client)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        res = _post(client, clip, name="../../etc/my clip.mp4")
        assert res.status_code == 200, res.text
        body = res.json()
        assert list(folder.iterdir()) == []  # deleted once processed
        health = client.get("/health").json()
    assert not folder.exists()  # the private folder goes with the server
    assert health["status"] == "ok" and health["running"] == 0
    assert body["clip"] == "my clip.mp4"  # the client's name, shown, sanitised; no server path leaks
    assert str(folder) not in json.dumps(body)
    # the same answer as comp-predict's Predictor.predict_paths for the same file (the one code path)
    cli = next(predictor.predict_paths([clip])).to_dict()
    assert body["prediction"]["label"] == cli["prediction"]["label"] and body["prediction"]["label"] in LABELS
    assert body["prediction"]["probs"] == pytest.approx(cli["prediction"]["probs"], abs=1e-6)
    assert body["modalities"] == cli["modalities"] and body["transcript"] == cli["transcript"]
    assert set(body) == set(cli)


def test_clip_without_audio_is_predicted_with_audio_missing_and_the_reason(predictor, clips, tmp_path):
    with _client(predictor, tmp_path) as client:
        res = _post(client, clips["noaudio"])
        assert res.status_code == 200, res.text
        body = res.json()
        assert list(_folder(client).iterdir()) == []
    assert body["modalities"]["audio"] == {"present": False, "reason": "no-audio-stream"}
    assert body["modalities"]["text"]["present"] is False and body["modalities"]["text"]["reason"]
    assert body["modalities"]["visual"]["present"] is True and body["prediction"]["label"] in LABELS


@pytest.mark.parametrize("kind, status, words", [
    ("corrupt", 415, "not a media file this server can read"),
    ("text", 415, "not a media file"),
])
def test_unreadable_uploads_get_a_4xx_with_the_reason(predictor, clips, tmp_path, kind, status, words):
    gated = Gated(predictor)
    with _client(gated, tmp_path) as client:
        res = _post(client, clips[kind])
        assert list(_folder(client).iterdir()) == []
    assert res.status_code == status and words in res.json()["error"]
    assert clips[kind].name in res.json()["error"] and "Traceback" not in res.text
    assert gated.calls == 0  # refused before the models


def _chunks(clip: Path, name: str = "big.mp4", size: int = 4096):
    data = clip.read_bytes()
    yield (f"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
           "Content-Type: video/mp4\r\n\r\n").encode()
    for i in range(0, len(data), size):
        yield data[i:i + size]
    yield b"\r\n--B--\r\n"


def test_size_limit_stops_reading_the_stream_at_the_limit(trained, tmp_path):
    """receive_upload writes as the body arrives and stops pulling it at the first chunk over the limit."""
    clip = trained["probe"] / "complete.mp4"
    limit = clip.stat().st_size // 3
    folder = UploadFolder(tmp_path)
    pulled: list[list[Path]] = []

    async def body():
        for chunk in _chunks(clip):
            pulled.append(folder.files())
            yield chunk

    with pytest.raises(UploadError) as err:
        asyncio.run(receive_upload("multipart/form-data; boundary=B", None, body(), folder, max_bytes=limit))
    assert err.value.status == 413 and "nothing was kept" in err.value.message
    total = len(list(_chunks(clip)))
    assert len(pulled) <= limit // 4096 + 3 < total  # the rest of the body was never read
    assert pulled[-1] and all(p.parent == folder.path for p in pulled[-1])  # it was written as it came
    assert folder.files() == []  # and the partial file deleted
    ok = asyncio.run(receive_upload("multipart/form-data; boundary=B", None, _async(_chunks(clip, "ok.mp4")),
                                    folder, max_bytes=clip.stat().st_size))
    assert ok.size == clip.stat().st_size and ok.path.read_bytes() == clip.read_bytes()
    assert ok.filename == "ok.mp4" and ok.path.name != "ok.mp4" and ok.path.suffix == ".mp4"
    folder.remove()


async def _async(chunks):
    for chunk in chunks:
        yield chunk


def test_oversize_upload_gets_413_and_leaves_nothing(predictor, trained, tmp_path):
    clip = trained["probe"] / "complete.mp4"
    gated = Gated(predictor)
    with _client(gated, tmp_path, max_upload_bytes=clip.stat().st_size // 3) as client:
        folder = _folder(client)
        # chunked (no Content-Length): found while streaming
        res = client.post("/predict", content=_chunks(clip),
                          headers={"content-type": "multipart/form-data; boundary=B"})
        assert res.status_code == 413, res.text
        assert "limit" in res.json()["error"] and "nothing was kept" in res.json()["error"]
        assert list(folder.iterdir()) == []
        # a declared Content-Length over the limit is refused before the body is read
        res = _post(client, clip)
        assert res.status_code == 413
        assert client.get("/health").json()["reserved"] == 0  # refused uploads give their place back
    assert gated.calls == 0


def test_clip_longer_than_the_limit_is_refused_before_extraction(predictor, clips, tmp_path):
    gated = Gated(predictor)
    with _client(gated, tmp_path, max_duration_s=5.0) as client:
        res = _post(client, clips["long"])
        assert list(_folder(client).iterdir()) == []
    assert res.status_code == 413 and "lasts 6.0 s" in res.json()["error"] and "5 s" in res.json()["error"]
    assert gated.calls == 0
    # a timeline has its own (longer) limit, and a plain clip is not held to it
    ran: list[Path] = []

    def timeline(predictor, path, options=None, progress=None):
        ran.append(path)
        return {"utterances": []}

    app = create_app(gated, ServeLimits(max_duration_s=10.0, max_timeline_duration_s=5.0), upload_parent=tmp_path,
                     timeline=timeline)
    with TestClient(app) as client:
        res = _post(client, clips["long"], url="/predict?timeline=1")
        assert list(_folder(client).iterdir()) == []
    assert res.status_code == 413 and "--max-timeline-duration" in res.json()["error"] and not ran
    app = create_app(gated, ServeLimits(max_duration_s=5.0, max_timeline_duration_s=10.0), upload_parent=tmp_path,
                     timeline=timeline)
    with TestClient(app) as client:
        assert _post(client, clips["long"], url="/predict?timeline=1").status_code == 200
    assert len(ran) == 1 and gated.calls == 0 and not ran[0].exists()


def test_a_recording_whose_header_states_no_duration_is_timed_by_its_packets(predictor, tmp_path):
    """A browser's MediaRecorder WebM states no duration: its length is read from the packets, so the limit
    still holds (413 before any model runs) and a clip within it is predicted whole."""
    speech = media.speak(TRAIN_TEXT["happy"][0], pitch=75, speed=185, amplitude=130)
    audio = np.concatenate([speech, media.silence(6.0 - len(speech) / 16000)])
    clip = media.write_streamed_webm(tmp_path / "recorded.webm", audio=audio, image=look("happy", 0))
    gated = Gated(predictor)
    with _client(gated, tmp_path, max_duration_s=5.0) as client:
        res = _post(client, clip)
        assert list(_folder(client).iterdir()) == []
    assert res.status_code == 413 and "lasts more than 5 s" in res.json()["error"] and gated.calls == 0
    with _client(predictor, tmp_path, max_duration_s=10.0) as client:
        res = _post(client, clip)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["duration_s"] == pytest.approx(6.0, abs=0.1)
    assert body["modalities"]["audio"]["present"] and body["modalities"]["text"]["present"]


def test_wrong_field_empty_file_and_no_multipart_say_what_to_send(predictor, trained, tmp_path):
    clip = trained["probe"] / "complete.mp4"
    with _client(predictor, tmp_path) as client:
        res = _post(client, clip, field="video")
        assert res.status_code == 422 and "'file'" in res.json()["error"] and "'video'" in res.json()["error"]
        res = client.post("/predict", files={"file": ("empty.mp4", b"", "video/mp4")})
        assert res.status_code == 422 and "empty" in res.json()["error"]
        res = client.post("/predict", content=clip.read_bytes(), headers={"content-type": "video/mp4"})
        assert res.status_code == 415 and "multipart/form-data" in res.json()["error"]
        res = client.get("/jobs/nope")
        assert res.status_code == 404 and "no job" in res.json()["error"]
        assert list(_folder(client).iterdir()) == []


def test_full_queue_answers_503_with_retry_after_and_models_never_run_concurrently(predictor, clips, tmp_path):
    clip = clips["noaudio"]  # no speech, so no Whisper: six quick predictions
    gated = Gated(predictor)
    with _client(gated, tmp_path, max_queued=2, retry_after_s=7) as client:
        first = _post(client, clip, url="/jobs")
        assert first.status_code == 202
        assert gated.started.wait(60)  # the first clip is inside the models, held at the gate
        queued = [_post(client, clip, url="/jobs") for _ in range(2)]
        assert [r.status_code for r in queued] == [202, 202]
        full = _post(client, clip, url="/jobs")
        assert full.status_code == 503 and full.headers["retry-after"] == "7"
        assert "retry in 7 s" in full.json()["error"]
        assert len(list(_folder(client).iterdir())) == 3  # the refused upload was never stored
        # blocking /predict calls from several threads queue behind the jobs as places free up
        gated.gate.set()
        ids = [r.json()["id"] for r in (first, *queued)]
        for job_id in ids:
            for _ in range(600):
                state = client.get(f"/jobs/{job_id}").json()
                if state["state"] in ("done", "failed"):
                    break
                time.sleep(0.1)
            assert state["state"] == "done" and state["result"]["prediction"]["label"] in LABELS
        results: list = [None] * 3
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _post(client, clip)))
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert [r.status_code for r in results] == [200, 200, 200]
        labels = {r.json()["prediction"]["label"] for r in results}
        assert list(_folder(client).iterdir()) == []
    assert gated.most == 1 and gated.calls == 6  # one clip at a time in the models, every one of them
    assert len(labels) == 1  # the same clip, the same answer, whichever came first


def test_a_job_seen_finished_has_already_given_back_its_place(tmp_path):
    """A client that sees its job finished (the done event, GET /jobs/{id}) and sends the next clip at once
    finds its place free: the worker frees it before the job says it is finished."""
    from pipeline.serve.jobs import Job, JobQueue, Outcome, QueueFull
    from pipeline.serve.uploads import Upload

    seen: list[tuple[str, int]] = []
    queue = JobQueue(lambda job: Outcome(200, {}), max_queued=1, keep_results=4)
    emit = Job.emit

    def watched(self, event, data):
        if event == "done":
            seen.append((self.state, queue.load()["running"]))
        return emit(self, event, data)

    mp = pytest.MonkeyPatch()
    mp.setattr(Job, "emit", watched)
    try:
        for k in range(3):
            queue.reserve()
            job = Job(kind="clip", upload=Upload(tmp_path / f"{k}.mp4", f"{k}.mp4", 0), info={})
            queue.submit(job)
            assert job.finished.wait(10)
        queue.reserve()  # one running place and max_queued=1 waiting: two places once the worker is idle
        queue.reserve()
        with pytest.raises(QueueFull):
            queue.reserve()
    finally:
        mp.undo()
        queue.stop()
    assert seen == [("done", 0)] * 3


def test_job_events_report_each_step_and_the_result_carries_face_crops(predictor, clips, tmp_path):
    with _client(predictor, tmp_path) as client:
        job = _post(client, clips["noaudio"], url="/jobs").json()
        with client.stream("GET", job["events"]) as stream:
            text = "".join(stream.iter_text())
        events = [(b.split("\n")[0].removeprefix("event: "), json.loads(b.split("\n")[1].removeprefix("data: ")))
                  for b in text.strip().split("\n\n") if b.startswith("event:")]
        state = client.get(job["result"]).json()
    steps = [d["step"] for e, d in events if e == "progress"]
    assert steps == [*PREDICT_STEPS, "done"]
    assert [d["done"] for e, d in events if e == "progress"] == list(range(len(PREDICT_STEPS) + 1))
    assert events[0] == ("state", {"state": "queued", "ahead": 0}) and events[-1][0] == "done"
    assert state["state"] == "done" and state["status"] == 200 and state["filename"] == "noaudio.mp4"
    assert state["result"]["modalities"]["visual"]["present"] is True
    assert 1 <= len(state["faces"]) <= 8 and state["faces_found"] >= len(state["faces"])
    assert all(uri.startswith("data:image/jpeg;base64,") for uri in state["faces"])


def test_predict_item_reports_steps_and_keeps_the_faces_it_embedded(predictor, clips):
    """The Predictor hooks the page uses: steps in order, the crops the visual extractor embedded, and the
    same JSON with or without them."""
    item = ClipItem(id="c", path=clips["noaudio"], source="c")
    calls: list[tuple[str, int, int]] = []
    seen = predictor.predict_item(item, progress=lambda *a: calls.append(a), keep_faces=True)
    plain = predictor.predict_item(item)
    assert [c[0] for c in calls] == [*PREDICT_STEPS, "done"] and {c[2] for c in calls} == {len(PREDICT_STEPS)}
    assert plain.faces is None and seen.faces and all(f.dtype == np.uint8 and f.ndim == 3 for f in seen.faces)
    assert len(seen.faces) == seen.diagnostics["face"]["frames_with_face"]
    a, b = seen.to_dict(), plain.to_dict()
    a.pop("timings_ms"), b.pop("timings_ms")
    assert a == b and "faces" not in a
    assert type(predictor.extraction.extractors["visual"]).__name__ == "FaceExtractor"  # unwrapped again
    noface = predictor.predict_item(ClipItem(id="n", path=clips["noface"], source="n"), keep_faces=True)
    assert noface.faces == [] and noface.modalities["visual"]["reason"] == "no-face"


def test_model_describes_labels_spec_and_training(predictor, trained, tmp_path):
    with _client(predictor, tmp_path) as client:
        info = client.get("/model").json()
        page = client.get("/")
    assert info["labels"] == list(LABELS) and info["task"] == "classification"
    assert info["spec_hash"] == predictor.spec_hash and info["extraction_spec"]["asr"]["name"]
    assert info["trained_on"]["features"] == "extracted from clips by comp-extract"
    assert info["trained_on"]["metrics"]["run"] and "offline" in info["presets"]["extract"]
    assert info["trained_on"]["clips"]["clips"] > 0  # what the timeline's margin follows
    assert info["limits"]["max_queued"] == ServeLimits().max_queued and info["timeline"] is False
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_client_file_names_are_only_displayed():
    assert display_name("../../etc/passwd") == "passwd"
    assert display_name("C:\\Users\\x\\clip one.MP4") == "clip one.MP4"
    assert display_name("\x00\x1b[31mred\u202e.mp4") == "[31mred.mp4"  # no control or bidi characters
    assert display_name("") == display_name("..") == display_name(None) == "upload"
    assert len(display_name("a" * 500 + ".mp4")) <= 80 and display_name("a" * 500 + ".mp4").endswith(".mp4")
    assert stored_suffix("x/../clip.MP4") == ".mp4" and stored_suffix("evil.sh") == "" and stored_suffix("a") == ""


def test_timeline_of_a_recording_through_the_api(predictor, tmp_path):
    """?timeline=1 runs pipeline.timeline.predict_timeline on the upload: one entry per utterance, the
    client's name, no server path, and its own progress steps as events."""
    recording = tmp_path / "two turns.mp4"
    spans = media.write_conversation(recording, [media.Turn("What a lovely surprise!", look("happy", 0)),
                                                 media.Turn("I miss her so much.", look("sad", 1), pause_s=0.5)])
    with TestClient(create_app(predictor, ServeLimits(), upload_parent=tmp_path)) as client:
        job = _post(client, recording, url="/jobs?timeline=1").json()
        with client.stream("GET", job["events"]) as stream:
            text = "".join(stream.iter_text())
        state = client.get(job["result"]).json()
        folder = _folder(client)
        assert list(folder.iterdir()) == []
    body = state["result"]
    assert state["status"] == 200 and state["kind"] == "timeline" and body["clip"] == "two turns.mp4"
    assert str(folder) not in json.dumps(body)
    assert len(body["utterances"]) == len(spans)
    for utt, (start, end) in zip(body["utterances"], spans):
        assert utt["start"] < end and utt["end"] > start and utt["prediction"]["label"] in LABELS
    steps = {json.loads(b.split("\n")[1].removeprefix("data: "))["step"]
             for b in text.strip().split("\n\n") if b.startswith("event: progress")}
    assert {"asr", "model"} <= steps


def test_cli_listens_on_localhost_unless_told_and_passes_its_limits(monkeypatch, tmp_path, capsys):
    import uvicorn

    from pipeline.cli import serve as cli
    from pipeline.serve.limits import MB

    seen: dict = {}
    fake = type("FakePredictor", (), {"checkpoint": "x/best.pt"})()
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(lambda cls, *a, **k: fake))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    assert cli.main(["--model", "x", "--max-upload-mb", "1.5", "--queue", "2", "--tmp", str(tmp_path), "-q"]) == 0
    app = seen.pop("app")
    app.state.queue.stop()
    app.state.folder.remove()
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000 and seen["workers"] == 1
    assert app.state.limits.max_upload_bytes == int(1.5 * MB) and app.state.limits.max_queued == 2
    with pytest.raises(SystemExit) as out:
        cli.main(["--model", "x", "--queue", "-1"])
    assert out.value.code == 2 and "max_queued" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli.main(["--model", str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
