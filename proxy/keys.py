"""Typed application state: every AppKey in one place."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.body import BodyBudget
from proxy.chat_store import ChatStore
from proxy.families.learned import FamilyState
from scheduler.config import CorralConfig
from scheduler.scheduler import Scheduler

CONFIG = web.AppKey("config", CorralConfig)
SCHEDULER = web.AppKey("scheduler", Scheduler)
SESSION = web.AppKey("session", aiohttp.ClientSession)
BODY_BUDGET = web.AppKey("body_budget", BodyBudget)

# Stateful LM Studio REST v1 chats (previous_response_id), per LM Studio port app.
CHAT_STORE = web.AppKey("lmstudio_chats", ChatStore)

# What family translation learns and keeps (proxy.families), shared by every port app.
FAMILIES = web.AppKey("families", FamilyState)
