"""Run code in a kernel of a user's single-user server, through the hub's proxy (REST + websocket)."""
from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect


async def _run(base: str, token: str, code: str, timeout: float) -> str:
    headers = {"Authorization": f"token {token}"}
    http = AsyncHTTPClient()
    resp = await http.fetch(HTTPRequest(base + "api/kernels", method="POST", body="{}", headers=headers))
    kernel = json.loads(resp.body)["id"]
    ws_url = base.replace("http", "ws", 1) + f"api/kernels/{kernel}/channels"
    conn = await websocket_connect(HTTPRequest(ws_url, headers=headers))
    msg_id = uuid.uuid4().hex
    conn.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": uuid.uuid4().hex,
                   "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    out = []
    try:
        while True:
            raw = await asyncio.wait_for(conn.read_message(), timeout)
            if raw is None:
                raise RuntimeError("kernel websocket closed")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                out.append("\n".join(msg["content"]["traceback"]))
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                break
    finally:
        conn.close()
        await http.fetch(HTTPRequest(base + f"api/kernels/{kernel}", method="DELETE", headers=headers))
    return "".join(out)


def run_in_kernel(hub_url: str, user: str, token: str, code: str, timeout: float = 60) -> str:
    """stdout (and any traceback) of ``code`` run in a new kernel of ``user``'s default server.

    Runs its own event loop in a thread: callers (Playwright's sync API) may have one running."""
    with ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, _run(f"{hub_url}/user/{user}/", token, code, timeout)).result()
