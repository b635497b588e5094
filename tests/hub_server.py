"""A small Hugging Face Hub-compatible server for tests: the endpoints huggingface_hub really calls
to create a repo, upload a folder (preupload, LFS batch + PUT, NDJSON commit) and download it
(repo info, tree, resolve). Files are stored on disk; nothing leaves 127.0.0.1.

Checked against huggingface_hub 1.x-2.x with ``HF_HUB_DISABLE_XET=1`` (the Xet protocol needs a
content-addressed store this server does not implement; the real Hub accepts both paths).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

TOKEN = "hf_local_test_token"
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    files: dict[str, dict] = field(default_factory=dict)  # path -> {size, sha256, blob, lfs}
    sha: str = "0" * 40
    private: bool = False


class HubState:
    """Repos, blobs and knobs to inject failures."""

    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, _Repo] = {}
        self.lock = threading.Lock()
        self.drop_uploads = 0  # drop the connection in the middle of this many LFS uploads
        self.requests: list[str] = []

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256


class _Handler(BaseHTTPRequestHandler):
    state: HubState  # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # ----- helpers ------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None) -> None:
        data = body if body is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        if body is None:
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message}, headers={"X-Error-Message": message})

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._error(401, "Invalid credentials in Authorization header")
        return False

    def _base(self) -> str:
        return f"http://{self.headers['Host']}"

    def _repo(self, repo_id: str) -> _Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
        return repo

    # ----- routes -------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(f"POST {path}")
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            return self._create_repo()
        if path == "/api/validate-yaml":
            self._body()
            return self._send(200, {"errors": [], "warnings": []})
        if path.endswith(".git/info/lfs/objects/batch"):
            return self._lfs_batch(path[1 : -len(".git/info/lfs/objects/batch")])
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
            repo_id = f"{parts[2]}/{parts[3]}"
            return self._preupload(repo_id) if parts[4] == "preupload" else self._commit(repo_id)
        self._error(404, f"no route POST {path}")

    def do_PUT(self) -> None:  # noqa: N802
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(f"PUT {path}")
        if not path.startswith("/lfs-upload/"):
            return self._error(404, f"no route PUT {path}")
        oid = path.rsplit("/", 1)[1]
        length = int(self.headers.get("Content-Length") or 0)
        with self.state.lock:
            drop = self.state.drop_uploads > 0
            if drop:
                self.state.drop_uploads -= 1
        if drop:
            self.rfile.read(length // 2)
            self.close_connection = True
            self.connection.shutdown(2)  # mid-upload: the client sees the connection go away
            return
        data = self.rfile.read(length)
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "uploaded content does not match its sha256 oid")
        self.state.blob_path(oid).write_bytes(data)
        self._send(200, {})

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        parsed = urlparse(self.path)
        path = unquote(parsed.path)
        self.state.requests.append(f"{self.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo = self._repo(f"{parts[2]}/{parts[3]}")
            if repo is None:
                return
            if parts[5] not in ("main", repo.sha):
                return self._send(404, {"error": "Revision not found"}, headers={"X-Error-Code": "RevisionNotFound"})
            if parts[4] == "revision":
                siblings = [{"rfilename": p} for p in sorted(repo.files)]
                return self._send(200, {"id": f"{parts[2]}/{parts[3]}", "sha": repo.sha, "siblings": siblings, "private": repo.private})
            return self._send(200, [self._tree_entry(p, f) for p, f in sorted(repo.files.items())])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        self._error(404, f"no route GET {path}")

    # ----- handlers -----------------------------------------------------------------------
    def _create_repo(self) -> None:
        body = json.loads(self._body() or b"{}")
        if not self._authorised():
            return
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": f"{self._base()}/{repo_id}"})
            self.state.repos[repo_id] = _Repo(private=bool(body.get("private")))
        self._send(200, {"url": f"{self._base()}/{repo_id}", "name": repo_id, "id": repo_id})

    def _preupload(self, repo_id: str) -> None:
        body = json.loads(self._body() or b"{}")
        if not self._authorised() or self._repo(repo_id) is None:
            return
        files = [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(_LFS_SUFFIXES) or f["size"] > 10_000_000 else "regular",
             "shouldIgnore": False, "oid": None}
            for f in body.get("files", [])
        ]
        self._send(200, {"files": files, "commitOid": self.state.repos[repo_id].sha})

    def _lfs_batch(self, repo_id: str) -> None:
        body = json.loads(self._body() or b"{}")
        if not self._authorised() or self._repo(repo_id) is None:
            return
        objects = []
        for obj in body.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.state.blob_path(obj["oid"]).is_file():
                entry["actions"] = {"upload": {"href": f"{self._base()}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _commit(self, repo_id: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not self._authorised():
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        staged = dict(repo.files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
                sha256 = hashlib.sha256(data).hexdigest()
                self.state.blob_path(sha256).write_bytes(data)
                staged[value["path"]] = {"size": len(data), "sha256": sha256, "blob": _git_blob_sha1(data), "lfs": False}
            elif key == "lfsFile":
                blob = self.state.blob_path(value["oid"])
                if not blob.is_file():
                    return self._error(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {value['size']}\n".encode()
                staged[value["path"]] = {"size": value["size"], "sha256": value["oid"], "blob": _git_blob_sha1(pointer), "lfs": True}
            elif key == "deletedFile":
                staged.pop(value["path"], None)
        digest = hashlib.sha1(json.dumps(sorted((p, f["sha256"]) for p, f in staged.items())).encode() + repo.sha.encode())
        repo.files, repo.sha = staged, digest.hexdigest()
        self._send(200, {"commitUrl": f"{self._base()}/{repo_id}/commit/{repo.sha}", "commitOid": repo.sha,
                         "success": True, "pullRequestUrl": None})

    @staticmethod
    def _tree_entry(path: str, info: dict) -> dict:
        entry = {"type": "file", "path": path, "size": info["size"], "oid": info["blob"]}
        if info["lfs"]:
            entry["lfs"] = {"oid": info["sha256"], "size": info["size"], "pointerSize": 134}
        return entry

    def _resolve(self, repo_id: str, revision: str, file_path: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if revision not in ("main", repo.sha):
            return self._send(404, {"error": "Revision not found"}, headers={"X-Error-Code": "RevisionNotFound"})
        info = repo.files.get(file_path)
        if info is None:
            return self._send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{info["sha256"] if info["lfs"] else info["blob"]}"'}
        if info["lfs"]:
            headers.update({"X-Linked-Etag": f'"{info["sha256"]}"', "X-Linked-Size": str(info["size"])})
        self._send(200, headers=headers, body=self.state.blob_path(info["sha256"]).read_bytes())


class LocalHub:
    """``with LocalHub(tmp_path) as hub:`` serves on 127.0.0.1; ``hub.endpoint`` is its URL."""

    def __init__(self, root: Path):
        self.state = HubState(Path(root))
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
