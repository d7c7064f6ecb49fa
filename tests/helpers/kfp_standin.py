"""A Kubeflow Pipelines API stand-in on 127.0.0.1: the part of REST API v2beta1 that kfp.Client 2.17 uses to
submit (healthz; experiments list/get/create; runs create/get; recurringruns create), recording every request.

Paths and JSON field names follow kfp_server_api (snake_case, as KFP's grpc-gateway sends them). A run's state
advances one step of `run_states` per GET, so a test can watch RUNNING → SUCCEEDED or RUNNING → FAILED.
"""

from __future__ import annotations

import itertools
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API = "/apis/v2beta1"
NOW = "2025-01-01T00:00:00Z"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: dict | None


@dataclass
class KfpStandIn:
    run_states: tuple[str, ...] = ("RUNNING", "SUCCEEDED")
    multi_user: bool = False
    token: str | None = None  # when set, requests without `Authorization: Bearer <token>` get 401
    flaky_polls: int = 0  # the first n GETs of a run answer `flaky_status`, as a restarting API server would
    flaky_status: int = 503  # or 429, an API asking clients to slow down
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring_runs: dict[str, dict] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    _polls: dict[str, int] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def add_experiment(self, name: str, namespace: str = "") -> str:
        eid = f"exp-{next(self._ids)}"
        self.experiments[eid] = {"experiment_id": eid, "display_name": name, "namespace": namespace, "created_at": NOW}
        return eid

    def calls(self, method: str, path: str) -> list[Request]:
        """The recorded requests to `path` (relative to /apis/v2beta1, without query) with `method`."""
        return [r for r in self.requests if r.method == method and r.path == API + path]

    # --- server lifecycle ------------------------------------------------------------------------------------

    def start(self) -> KfpStandIn:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                standin._handle(self, "GET")

            def do_POST(self):
                standin._handle(self, "POST")

            def log_message(self, *args):  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="kfp-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- the API ---------------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        req = Request(
            method,
            parsed.path,
            dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)),
            {k.lower(): v for k, v in h.headers.items()},
            json.loads(raw) if raw else None,
        )
        self.requests.append(req)
        if self.token is not None and req.headers.get("authorization") != f"Bearer {self.token}":
            return _send(h, 401, {"code": 16, "message": "Unauthenticated: bad or missing bearer token"})
        status, body = self._route(req)
        _send(h, status, body)

    def _route(self, req: Request) -> tuple[int, dict]:
        path, m = req.path.removeprefix(API), req.method
        if m == "GET" and path == "/healthz":
            return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}
        if m == "GET" and path == "/experiments":
            found = self._list_experiments(req.query)
            return (200, found) if found is not None else (400, {"code": 3, "message": "unsupported filter"})
        if m == "POST" and path == "/experiments":
            eid = self.add_experiment(req.body["display_name"], req.body.get("namespace") or "")
            return 200, self.experiments[eid]
        if m == "GET" and path.startswith("/experiments/") and path[13:] in self.experiments:
            return 200, self.experiments[path[13:]]
        if m == "POST" and path == "/runs":
            if req.body.get("experiment_id") not in self.experiments:
                return 400, {"code": 3, "message": f"experiment {req.body.get('experiment_id')} not found"}
            rid = f"run-{next(self._ids)}"
            self.runs[rid] = {**req.body, "run_id": rid, "state": "PENDING", "created_at": NOW}
            return 200, self.runs[rid]
        if m == "GET" and path.startswith("/runs/") and path[6:] in self.runs:
            if self.flaky_polls > 0:
                self.flaky_polls -= 1
                return self.flaky_status, {"code": 14, "message": "upstream connect error"}
            return 200, self._poll_run(path[6:])
        if m == "POST" and path == "/recurringruns":
            rid = f"recurring-{next(self._ids)}"
            self.recurring_runs[rid] = {**req.body, "recurring_run_id": rid, "status": "ENABLED", "created_at": NOW}
            return 200, self.recurring_runs[rid]
        return 404, {"code": 5, "message": f"no route for {m} {req.path}"}

    def _list_experiments(self, query: dict[str, str]) -> dict | None:
        found = list(self.experiments.values())
        for p in json.loads(query["filter"])["predicates"] if query.get("filter") else []:
            if p.get("key") != "display_name" or p.get("operation") not in ("EQUALS", 1):  # kfp sends the enum's number
                return None
            found = [e for e in found if e["display_name"] == p["stringValue"]]
        if query.get("namespace"):
            found = [e for e in found if e["namespace"] == query["namespace"]]
        return {"experiments": found, "total_size": len(found)} if found else {}

    def _poll_run(self, rid: str) -> dict:
        n = self._polls.get(rid, 0)
        self._polls[rid] = n + 1
        state = self.run_states[min(n, len(self.run_states) - 1)]
        run = self.runs[rid]
        run["state"] = state
        if state == "FAILED":
            run["error"] = {"code": 2, "message": "task distill failed: CUDA out of memory"}
        return run


def _send(h: BaseHTTPRequestHandler, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)
