"""A multipart upload streamed into a private folder, under a size limit enforced while it arrives.

FastAPI's own `UploadFile` spools the whole body (to the system temp folder) before the route runs, so a
limit could only be checked afterwards; here python-multipart's streaming parser is fed the request body
chunk by chunk and the file part is written straight into the server's private folder (mode 0700), stopping
at the first byte over the limit. The client's file name is only ever displayed (sanitised): the file on
disk gets a random name, and keeps the client's extension only when it is a known media extension.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import unicodedata
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

from core.errors import CompError
from pipeline.inputs import MEDIA_EXTENSIONS

FIELD = "file"  # the multipart field that carries the clip
MULTIPART_SLACK = 64 * 1024  # bytes of multipart framing and small fields tolerated on top of the file
MAX_NAME_CHARS = 80


class UploadError(CompError):
    """A request the server refuses; `status` is the HTTP status, the message says why and what to do."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def display_name(name: str | None) -> str:
    """The client's file name made safe to show: its last path component, printable characters only,
    at most MAX_NAME_CHARS; "upload" when nothing is left. Never used as a path."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in unicodedata.normalize("NFC", base) if unicodedata.category(ch)[0] not in "CZ"
                   or ch == " ")
    base = base.strip(" .")
    if len(base) > MAX_NAME_CHARS:
        stem, dot, ext = base.rpartition(".")
        base = (stem[: MAX_NAME_CHARS - len(ext) - 2] + "…" + dot + ext) if dot and len(ext) <= 8 \
            else base[: MAX_NAME_CHARS - 1] + "…"
    return base or "upload"


def stored_suffix(name: str | None) -> str:
    """The extension the stored file gets: the client's, lower-cased, only when it is a media extension
    (FFmpeg probes the content either way; the extension only helps it with raw formats)."""
    suffix = os.path.splitext(display_name(name))[1].lower()
    return suffix if suffix in MEDIA_EXTENSIONS else ""


class UploadFolder:
    """A private temporary folder (mode 0700, from tempfile.mkdtemp) for the uploads of one server."""

    def __init__(self, parent: str | Path | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="comp-serve-", dir=parent))
        os.chmod(self.path, 0o700)  # mkdtemp's default; said again so that no umask or platform changes it

    def new_file(self, suffix: str = "") -> Path:
        return self.path / f"{uuid.uuid4().hex}{suffix}"

    def files(self) -> list[Path]:
        return sorted(self.path.iterdir()) if self.path.exists() else []

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class Upload:
    """A received file: where it lies (a generated name) and what the client called it (display only)."""

    path: Path
    filename: str
    size: int
    other_fields: list[str] = field(default_factory=list)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


class _Receiver:
    """Callbacks for python-multipart's parser: the `file` part goes to disk, other parts are counted."""

    def __init__(self, folder: UploadFolder, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.part_name = ""
        self.part_filename: str | None = None
        self.out: BinaryIO | None = None
        self.upload: Upload | None = None
        self.other: list[str] = []
        self.size = 0
        self.too_large = False

    # header callbacks
    def on_part_begin(self) -> None:
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_field.strip().lower()] = self.header_value.strip()
        self.header_field = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.part_name = options.get(b"name", b"").decode("utf-8", "replace")
        raw = options.get(b"filename")
        self.part_filename = raw.decode("utf-8", "replace") if raw is not None else None
        if self.part_name == FIELD and self.upload is None:
            path = self.folder.new_file(stored_suffix(self.part_filename))
            # O_EXCL: a fresh name in a folder only this process can write to; nothing is followed or replaced
            self.out = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
            self.upload = Upload(path=path, filename=display_name(self.part_filename), size=0)
        else:
            self.other.append(self.part_name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        self.size += n
        if self.size > self.max_bytes:
            self.too_large = True
            return
        if self.out is not None:
            self.out.write(data[start:end])
            assert self.upload is not None
            self.upload.size += n

    def on_part_end(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None

    def close(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None


async def receive_upload(content_type: str | None, content_length: str | None, body: AsyncIterator[bytes],
                         folder: UploadFolder, *, max_bytes: int) -> Upload:
    """Stream a multipart/form-data body into `folder`; the part named FIELD is the clip.

    Errors (UploadError; nothing is left on disk): 415 not multipart; 413 larger than `max_bytes` (said by
    Content-Length, or found while streaming: the partial file is deleted); 422 no FIELD part, or it is empty.
    """
    ctype, options = parse_options_header((content_type or "").encode("latin-1", "replace"))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UploadError(415, f"send the clip as multipart/form-data in the field {FIELD!r} "
                               f"(for example: curl -F {FIELD}=@clip.mp4 http://HOST/predict)")
    limit_msg = (f"the upload is larger than this server's limit of {_mb(max_bytes)} (comp-serve "
                 "--max-upload-mb); nothing was kept")
    try:
        declared = int(content_length) if content_length else None
    except ValueError:
        declared = None
    if declared is not None and declared > max_bytes + MULTIPART_SLACK:
        raise UploadError(413, limit_msg)
    receiver = _Receiver(folder, max_bytes)
    parser = MultipartParser(boundary, {name: getattr(receiver, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
        "on_part_data", "on_part_end")})
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            parser.write(chunk)
            if receiver.too_large or received > max_bytes + MULTIPART_SLACK:
                raise UploadError(413, limit_msg)
        parser.finalize()
    except UploadError:
        _discard(receiver)
        raise
    except Exception as err:  # a malformed body, or the client went away: nothing is kept either way
        _discard(receiver)
        if type(err).__name__ == "ClientDisconnect":
            raise
        raise UploadError(400, f"the multipart body cannot be read: {err}") from None
    receiver.close()
    upload = receiver.upload
    if upload is None:
        got = ", ".join(repr(n) for n in receiver.other) or "none"
        raise UploadError(422, f"no multipart field {FIELD!r} in the request (fields sent: {got}); send the clip "
                               f"as {FIELD}=@clip.mp4")
    upload.other_fields = receiver.other
    if upload.size == 0:
        upload.delete()
        raise UploadError(422, f"the uploaded file {upload.filename!r} is empty (0 bytes)")
    return upload


def _discard(receiver: _Receiver) -> None:
    receiver.close()
    if receiver.upload is not None:
        receiver.upload.delete()
