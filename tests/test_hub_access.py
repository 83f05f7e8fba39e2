"""Learners' hub models: the ``colab``/``kaggle`` profile's hub id loads through ``from_pretrained``, and a gated,
private or unauthorised repo fails with a message saying which step of the token flow is missing.

No network here, so a local stand-in for the Hugging Face hub answers over HTTP (``HF_ENDPOINT``) the way the hub
does, as ``huggingface_hub.utils._http.hf_raise_for_status`` reads it: files with ``X-Repo-Commit``/``ETag``
headers; a gated repo 401 + ``X-Error-Code: GatedRepo`` without a token and 403 with a token whose account has no
access; a missing repo ``RepoNotFound``; an unknown token 401 "Invalid credentials in Authorization header".
transformers and huggingface_hub run unchanged against it in a subprocess (their endpoint is read at import).
The stand-in serves the course's tiny random model under the id ``HuggingFaceTB/SmolLM2-360M-Instruct``: what is
tested is the path (profile -> hub id -> download into the hub cache -> ``from_pretrained``), not SmolLM2-360M's
weights, which only a machine with network can fetch.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from lora_course.notebook import gated_models_markdown

HUB_MODEL = "HuggingFaceTB/SmolLM2-360M-Instruct"
GATED = "meta-llama/Llama-3.2-1B-Instruct"
MISSING = "nobody/no-such-model"
VALID_TOKEN, INVALID_TOKEN = "hf_valid_but_no_licence", "hf_revoked"
CLIENT = r'''
import json, os, sys
from lora_course.hub_access import explain_load_error
from lora_course.models import DEFAULT_MODEL_IDS, load_base
out = {"default_ids": {p: DEFAULT_MODEL_IDS[p] for p in ("colab", "kaggle")}}
model, tok = load_base("colab")
info = model.lora_course_info
out["colab"] = {"source": info.source, "profile": info.profile, "n_params": info.n_params,
                "reply_ids": tok("hello")["input_ids"]}
out["kaggle_source"] = load_base("kaggle")[0].lora_course_info.source
for token in (None, sys.argv[1], sys.argv[2]):
    os.environ.pop("HF_TOKEN", None) if token is None else os.environ.__setitem__("HF_TOKEN", token)
    for repo in sys.argv[3:]:
        try:
            load_base("colab", repo)
            out[f"{repo}|{token}"] = None
        except Exception as e:
            out[f"{repo}|{token}"] = {"type": type(e).__name__, "message": str(e),
                                      "explained": explain_load_error(repo, e)}
print("HUB-RESULT " + json.dumps(out))
'''


class FakeHub(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, Path]] = {}
    seen: ClassVar[list[str]] = []

    def _send(self, code: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def _reply(self) -> None:
        path = self.path.split("?")[0]
        auth = self.headers.get("Authorization")
        self.seen.append(f"{self.command} {path} {auth}")
        if auth == f"Bearer {INVALID_TOKEN}":
            return self._send(401, {"X-Error-Message": "Invalid credentials in Authorization header"})
        if path.startswith((f"/{GATED}/", f"/api/models/{GATED}")):
            if auth is None:
                return self._send(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model "
                                        f"{GATED} is restricted. You must have access to it and be authenticated."})
            return self._send(403, {"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to model {GATED} is "
                                    "restricted and you are not in the authorized list."})
        m = re.match(rf"^/{re.escape(HUB_MODEL)}/resolve/[^/]+/(.+)$", path)
        if m:
            f = self.files.get(m.group(1))
            if f is None:
                return self._send(404, {"X-Error-Code": "EntryNotFound"})
            data = f.read_bytes()
            return self._send(200, {"X-Repo-Commit": "0" * 40, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, data)
        if path.startswith(f"/api/models/{HUB_MODEL}/tree/"):
            return self._send(404, {"X-Error-Code": "EntryNotFound"})
        return self._send(401 if auth is None else 404, {"X-Error-Code": "RepoNotFound"})

    do_GET = do_HEAD = _reply

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    from lora_course.models import tiny_model_dir

    model_dir = tiny_model_dir()
    FakeHub.files = {p.name: p for p in model_dir.iterdir() if p.is_file() and p.name != "COMPLETE.json"}
    FakeHub.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path_factory.mktemp("hf-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update({"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(home),
                "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"})
    try:
        proc = subprocess.run([sys.executable, "-c", CLIENT, VALID_TOKEN, INVALID_TOKEN, GATED, MISSING],
                              check=False, env=env, capture_output=True, text=True, timeout=600)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("HUB-RESULT "))[11:])
    return result, home, list(FakeHub.seen)


def test_colab_and_kaggle_profiles_load_their_hub_id_through_from_pretrained(hub_run):
    result, home, seen = hub_run
    assert result["default_ids"] == {"colab": HUB_MODEL, "kaggle": HUB_MODEL}
    assert result["colab"]["source"] == HUB_MODEL and result["kaggle_source"] == HUB_MODEL
    assert result["colab"]["profile"] == "colab" and result["colab"]["n_params"] > 0 and result["colab"]["reply_ids"]
    assert any(s.startswith(f"GET /{HUB_MODEL}/resolve/main/model.safetensors") for s in seen)  # downloaded
    snapshot = home / "hub" / f"models--{HUB_MODEL.replace('/', '--')}" / "snapshots" / ("0" * 40)
    assert (snapshot / "config.json").is_file() and (snapshot / "model.safetensors").is_file()


def test_gated_repo_without_a_token(hub_run):
    result, _, seen = hub_run
    r = result[f"{GATED}|None"]
    assert r["type"] == "ModelSourceError"
    msg = r["explained"]
    assert f"{GATED} is a gated model and this runtime sent no Hugging Face token" in msg
    assert f"https://huggingface.co/{GATED}" in msg and "huggingface.co/settings/tokens" in msg
    assert "hf auth login" in msg  # off Colab/Kaggle: the local way to give a token
    assert any(s.startswith(f"HEAD /{GATED}/") and s.endswith("None") for s in seen)


def test_gated_repo_with_a_token_whose_account_has_no_access(hub_run):
    result, _, seen = hub_run
    msg = result[f"{GATED}|{VALID_TOKEN}"]["explained"]
    assert "your token's account has no access" in msg and "accept the licence" in msg
    assert any(s.endswith(f"Bearer {VALID_TOKEN}") for s in seen)  # the token was really sent


def test_rejected_token(hub_run):
    result, _, _ = hub_run
    for repo in (GATED, MISSING):
        msg = result[f"{repo}|{INVALID_TOKEN}"]["explained"]
        assert "rejected the Hugging Face token" in msg and "huggingface.co/settings/tokens" in msg


def test_missing_or_private_repo(hub_run):
    result, _, _ = hub_run
    no_token = result[f"{MISSING}|None"]["explained"]
    assert f"{MISSING} was not found on the hub" in no_token and "this runtime sent no token" in no_token
    with_token = result[f"{MISSING}|{VALID_TOKEN}"]["explained"]
    assert "was not found" in with_token and "your token's account needs access" in with_token


def test_not_a_hub_error_is_left_to_the_caller():
    from lora_course.hub_access import explain_load_error

    assert explain_load_error("x/y", OSError("disk full")) is None


def test_the_token_flow_markdown_names_every_platform():
    md = gated_models_markdown()
    for needle in ("huggingface.co/settings/tokens", "HF_TOKEN", "Secrets", "kaggle_secrets", "hf auth login",
                   "accept", "MODEL_ID"):
        assert needle in md, needle
