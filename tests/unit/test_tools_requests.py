"""How each family names MCP servers (proxy/tools/): the uses a body gives, approval
rules, refused URLs and shapes, and the items' wire form. Pure: no server runs."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.tools import anthropic, chat, lmstudio, responses
from proxy.tools.calls import Approvals, McpCall, Pending
from proxy.tools.items import call_item
from proxy.tools.servers import Servers
from scheduler.config.root import CorralConfig
from scheduler.errors import BadRequest

URL = "http://127.0.0.1:9/mcp"
CFG = CorralConfig(mcp_servers=[
    {"name": "notes", "command": ["true"]},
    {"name": "web", "url": URL},
    {"name": "asks", "command": ["true"], "require_approval": "always"}])


@pytest.fixture
def servers() -> Servers:
    return Servers(lambda: CFG, None)  # type: ignore[arg-type]  # no HTTP here


def test_responses_uses_and_approval_rules(servers: Servers) -> None:
    used = responses.uses({"tools": [
        {"type": "function", "name": "f"},
        {"type": "mcp", "server_label": "notes", "allowed_tools": ["a"]},
        {"type": "mcp", "server_label": "web", "server_url": URL,
         "require_approval": {"never": {"tool_names": ["safe"]}}},
        {"type": "mcp", "server_label": "asks", "require_approval": "never"}]}, servers)
    assert [u.server for u in used] == ["notes", "web", "asks"]
    assert used[0].allowed == frozenset({"a"}) and not used[0].approval("a")
    assert not used[1].approval("safe") and used[1].approval("other")
    assert used[2].approval("anything")  # the config's "always" wins


@pytest.mark.parametrize("tool", [
    {"type": "mcp"},
    {"type": "mcp", "server_label": "web", "server_url": "http://evil.example/mcp"},
    {"type": "mcp", "server_label": "notes", "server_url": URL},
    {"type": "mcp", "server_label": "notes", "connector_id": "connector_gmail"},
    {"type": "mcp", "server_label": "notes", "allowed_tools": "a"},
    {"type": "mcp", "server_label": "notes", "require_approval": 3},
])
def test_responses_refusals(servers: Servers, tool: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        responses.uses({"tools": [tool]}, servers)


def test_chat_anthropic_and_lmstudio_shapes(servers: Servers) -> None:
    assert [u.server for u in chat.uses({"mcp_servers": ["notes", {"name": "web"}]},
                                        servers)] == ["notes", "web"]
    assert chat.uses({}, servers) == []
    got = anthropic.uses({"mcp_servers": [
        {"type": "url", "name": "web", "url": URL},
        {"type": "url", "name": "notes", "tool_configuration": {"enabled": False}}],
        "tools": [{"type": "mcp_toolset", "mcp_server_name": "notes"}]}, servers)
    assert [u.server for u in got] == ["web", "notes"]
    used, info = lmstudio.uses({"integrations": [
        "mcp/notes", {"type": "ephemeral_mcp", "server_label": "web"}]}, servers)
    assert [u.server for u in used] == ["notes", "web"]
    assert info["notes"] == {"type": "plugin", "plugin_id": "mcp/notes"}


@pytest.mark.parametrize("call", [
    lambda s: chat.uses({"mcp_servers": "notes"}, s),
    lambda s: chat.uses({"mcp_servers": [{"name": "notes", "url": URL}]}, s),
    lambda s: chat.uses({"mcp_servers": ["asks"]}, s),  # no approval step in chat
    lambda s: anthropic.uses({"mcp_servers": [{"type": "url", "name": "web",
                                               "url": "http://x/mcp"}]}, s),
    lambda s: lmstudio.uses({"integrations": [{"type": "ephemeral_mcp",
                                               "server_label": "web",
                                               "headers": {"A": "b"}}]}, s),
])
def test_other_refusals(servers: Servers, call: Any) -> None:
    with pytest.raises(BadRequest):
        call(servers)


def test_call_items_tell_tool_errors_from_protocol_errors() -> None:
    ok = McpCall("c1", "notes", "add", '{"a": 1}', output="2")
    assert call_item(ok, done=True)["status"] == "completed"
    tool = McpCall("c2", "notes", "add", "{}", error="bad", tool_failed=True)
    assert call_item(tool, done=True)["error"]["type"] == "mcp_tool_execution_error"
    lost = McpCall("c3", "notes", "add", "{}", error="timed out")
    assert call_item(lost, done=True)["error"]["type"] == "mcp_protocol_error"
    assert call_item(lost, done=False)["status"] == "in_progress"


def test_approvals_are_taken_once_and_bounded() -> None:
    store = Approvals(size=2)
    first = Pending("m", {}, [], [])
    store.put(first, ["a", "b"])
    assert store.take("a") is first
    assert store.take("b") is None  # one answer resumes the loop once
    for i in range(3):
        store.put(Pending("m", {}, [], []), [f"x{i}"])
    assert store.take("x0") is None and store.take("x2") is not None


def test_config_rules() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        CorralConfig(mcp_servers=[{"name": "n"}])
    with pytest.raises(ValueError, match="exactly one"):
        CorralConfig(mcp_servers=[{"name": "n", "command": ["x"], "url": URL}])
    with pytest.raises(ValueError, match="not an http"):
        CorralConfig(mcp_servers=[{"name": "n", "url": "file:///etc/passwd"}])
    with pytest.raises(ValueError, match="valid MCP server name"):
        CorralConfig(mcp_servers=[{"name": "a b", "command": ["x"]}])
    with pytest.raises(ValueError, match="unique"):
        CorralConfig(mcp_servers=[{"name": "n", "command": ["x"]},
                                  {"name": "n", "command": ["y"]}])
