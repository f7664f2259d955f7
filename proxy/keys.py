"""Typed application state: every AppKey in one place."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.body import BodyBudget
from scheduler.config import CorralConfig
from scheduler.scheduler import Scheduler

CONFIG = web.AppKey("config", CorralConfig)
SCHEDULER = web.AppKey("scheduler", Scheduler)
SESSION = web.AppKey("session", aiohttp.ClientSession)
BODY_BUDGET = web.AppKey("body_budget", BodyBudget)
