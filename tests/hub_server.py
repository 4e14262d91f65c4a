"""A small local fake of the Hugging Face Hub endpoints that `HfApi.create_repo` + `upload_folder` call.

It is a contract fake, not a Hub: it speaks the routes and payloads that huggingface_hub 2.4 sends
(read from its `hf_api.py`, `_commit_api.py` and `_upload_pipeline.py`) so that hfqat's upload code runs
unchanged against `endpoint=server.url`:

- ``POST /api/repos/create``                        -> ``{"url"}``; 409 when the repo exists
- ``GET  /api/models/{repo_id}``                    -> minimal repo info (``create_repo`` asks for it after a 401/403)
- ``GET  /api/models/{repo_id}/tree/{rev}``         -> flat file list (``upload_folder(delete_patterns=...)``)
- ``POST /api/validate-yaml``                       -> README front matter check (legacy non-xet commit path)
- ``POST /api/models/{repo_id}/preupload/{rev}``    -> every file ``"regular"``: content then travels base64
  inside the commit, so neither an LFS nor a xet storage server is needed (the client accepts "regular" for
  files of any size; what the real Hub stores as LFS/xet is therefore NOT exercised here)
- ``POST /api/models/{repo_id}/commit/{rev}``       -> ndjson commit; files are stored in memory

Every request must carry ``Authorization: Bearer <token>`` (else 401). ``fail_next(n, status, route)``
makes the next ``n`` matching requests fail, to test error handling and retries. The server listens on
127.0.0.1 on an ephemeral port in a daemon thread, refuses requests past ``max_requests`` and shuts down by
itself after ``lifetime_s`` even if a test forgets to stop it. Tokens are never stored or logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = {
    "create": ("POST", re.compile(r"^/api/repos/create$")),
    "validate_yaml": ("POST", re.compile(r"^/api/validate-yaml$")),
    "preupload": ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")),
    "commit": ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")),
    "tree": ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)$")),
    "repo_info": ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
}


@dataclass
class FakeRepo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)  # commit summaries, oldest first


@dataclass
class _Failure:
    count: int
    status: int
    route: str | None  # None = any route


class FakeHub:
    """Context manager: ``with FakeHub(token="hf_x") as hub: HfApi(endpoint=hub.url)...``.

    Attributes after use: ``repos`` ({repo_id: FakeRepo}), ``log`` ([(method, path, route, status)]).
    """

    def __init__(self, token: str, *, max_requests: int = 200, lifetime_s: float = 60.0):
        self._token = token
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[tuple[str, str, str | None, int]] = []
        self._failures: list[_Failure] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None
        self._last_url = ""

    # -- lifecycle -----------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return _url_of(self._server) if self._server is not None else self._last_url

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        # Stops by itself even if the test never calls stop().
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Idempotent; also called by the lifetime timer."""
        with self._lock:
            server, self._server = self._server, None
        if self._timer is not None:
            self._timer.cancel()
        if server is not None:
            self._last_url = _url_of(server)
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test controls -------------------------------------------------------------------------------------
    def fail_next(self, n: int, status: int, route: str | None = None) -> None:
        """The next `n` requests to `route` (a key of ROUTES; None = any) answer `status`."""
        if route is not None and route not in ROUTES:
            raise ValueError(f"route={route!r}; allowed: {sorted(ROUTES)} or None")
        with self._lock:
            self._failures.append(_Failure(n, status, route))

    def routes_called(self) -> list[str | None]:
        return [route for _, _, route, _ in self.log]

    # -- request handling (called from server threads) -----------------------------------------------------
    def _take_failure(self, route: str | None) -> int | None:
        with self._lock:
            for failure in self._failures:
                if failure.count > 0 and failure.route in (None, route):
                    failure.count -= 1
                    return failure.status
        return None

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict]:
        route, match = None, None
        for name, (route_method, pattern) in ROUTES.items():
            m = pattern.match(path)
            if m and method == route_method:
                route, match = name, m
                break
        with self._lock:
            over_budget = len(self.log) >= self.max_requests
        if over_budget:
            status, payload = 429, {"error": "fake hub: request budget exhausted"}
        elif headers.get("authorization") != f"Bearer {self._token}":
            status, payload = 401, {"error": "Invalid credentials in Authorization header"}
        elif (injected := self._take_failure(route)) is not None:
            status, payload = injected, {"error": f"fake hub: injected failure {injected}"}
        elif route is None:
            status, payload = 404, {"error": f"fake hub: no route for {method} {path}"}
        else:
            status, payload = getattr(self, f"_route_{route}")(match, json_or_bytes(route, body))
        with self._lock:
            self.log.append((method, path, route, status))
        return status, payload

    def _route_create(self, match, payload: dict) -> tuple[int, dict]:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.url}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}
            self.repos[repo_id] = FakeRepo(private=payload.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id}

    def _route_repo_info(self, match, _body) -> tuple[int, dict]:
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        return 200, {"id": match["repo"], "sha": _sha(repo), "private": repo.private,
                     "siblings": [{"rfilename": name} for name in sorted(repo.files)]}

    def _route_tree(self, match, _body) -> tuple[int, list | dict]:
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        with self._lock:
            files = dict(repo.files)
        return 200, [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                     for name, data in sorted(files.items())]

    def _route_validate_yaml(self, match, payload: dict) -> tuple[int, dict]:
        text = payload.get("content", "")
        front = re.match(r"^---\n(.*?)\n---\n", text, re.S)
        if front is None or not isinstance(yaml.safe_load(front[1]), dict):
            return 400, {"errors": [{"message": "README.md has no YAML front matter mapping"}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def _route_preupload(self, match, payload: dict) -> tuple[int, dict]:
        if match["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
        return 200, {"files": files, "commitOid": _sha(self.repos[match["repo"]])}

    def _route_commit(self, match, lines: list[dict]) -> tuple[int, dict]:
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "commit payload must start with a header line"}
        added: dict[str, bytes] = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file" and value.get("encoding") == "base64":
                added[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile":
                repo.files.pop(value["path"], None)
            else:  # lfsFile etc.: never requested by this fake's preupload answers
                return 400, {"error": f"fake hub: unsupported commit operation {line['key']!r}"}
        with self._lock:
            repo.files.update(added)
            repo.commits.append(lines[0]["value"]["summary"])
            oid = _sha(repo)
        return 200, {"commitUrl": f"{self.url}/{match['repo']}/commit/{oid}", "commitOid": oid,
                     "success": True}


def _url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def _sha(repo: FakeRepo) -> str:
    digest = hashlib.sha1()
    for name in sorted(repo.files):
        digest.update(name.encode() + hashlib.sha1(repo.files[name]).digest())
    digest.update(str(len(repo.commits)).encode())
    return digest.hexdigest()


def json_or_bytes(route: str | None, body: bytes):
    """Commit bodies are ndjson (one JSON object a line), the others plain JSON."""
    if route == "commit":
        return [json.loads(line) for line in body.splitlines() if line.strip()]
    if route in ("create", "preupload", "validate_yaml"):
        return json.loads(body or b"{}")
    return body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    fake: FakeHub

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _dispatch(self) -> None:
        body = self._read_body()
        path = self.path.split("?", 1)[0]
        status, payload = self.fake.handle(self.command, path, self.headers, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch

    def log_message(self, format: str, *args) -> None:  # silence stderr access logs
        pass
