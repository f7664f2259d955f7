"""Typed application state: every AppKey in one place."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from proxy.calls.tracking import InFlight
from proxy.dialects.chat_store import ChatStore
from proxy.dialects.families.learned import FamilyState
from proxy.edge.body import BodyBudget
from proxy.ops.operations import Operations
from proxy.ops.runtime_models import RuntimeModels
from proxy.tools.calls import Approvals
from proxy.tools.servers import Servers
from scheduler.config.root import CorralConfig
from scheduler.discovery.watch import Discovery
from scheduler.scheduling.scheduler import Scheduler

CONFIG = web.AppKey("config", CorralConfig)
SCHEDULER = web.AppKey("scheduler", Scheduler)
SESSION = web.AppKey("session", aiohttp.ClientSession)
BODY_BUDGET = web.AppKey("body_budget", BodyBudget)

# Stateful LM Studio REST v1 chats (previous_response_id), per LM Studio port app.
CHAT_STORE = web.AppKey("lmstudio_chats", ChatStore)

# What family translation learns and keeps (proxy.dialects.families), shared by every port app.
FAMILIES = web.AppKey("families", FamilyState)

# Models found on disk (the scanner) and pulls in progress, shared by every port.
DISCOVERY = web.AppKey("discovery", Discovery)
PULL_LOCKS = web.AppKey("pull_locks", dict[str, asyncio.Lock])

# Calls in flight by request id (cancel) and their captures, shared by every port app.
CALLS = web.AppKey("calls", InFlight)
# The configured MCP servers (started on first use) and the tool loops that wait for a
# client's approval, shared by every port app (proxy/tools/).
MCP_SERVERS = web.AppKey("mcp_servers", Servers)
MCP_APPROVALS = web.AppKey("mcp_approvals", Approvals)
# Loads the admin API answered at once, followed by id (proxy/ops/operations.py), and the
# models admins created at runtime (proxy/ops/runtime_models.py).
OPERATIONS = web.AppKey("operations", Operations)
RUNTIME_MODELS = web.AppKey("runtime_models", RuntimeModels)
