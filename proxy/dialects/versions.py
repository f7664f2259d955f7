"""The server versions Corral's Ollama and LM Studio ports report.

Clients gate features on these numbers, so each is the version of the real server
whose API the port implements, kept current: an old number makes a client refuse
the port or turn features off, although Corral serves them. Who needs what
(tests/unit/test_versions.py names each client; docs/compatibility.md lists them):

* Codex ``--oss --local-provider ollama`` refuses an Ollama older than 0.13.4, the
  first with ``/v1/responses`` ("Ollama 0.12.6 is too old. Codex requires Ollama
  0.13.4 or newer").
* Claude Code against the Ollama port uses ``/v1/messages``, which Ollama has had
  since 0.14.0.
* Open WebUI parses ``/api/version`` with ``int`` on each dot-separated part, so the
  number stays purely numeric (no ``-rc``, no ``v``).
* The LM Studio SDKs read ``system.version`` without gating on it; Corral's port
  speaks the 0.4 REST API (``/api/v1/models``, ``/api/v1/chat``), so it reports a
  0.4 release.

Raise them with the servers' releases (Ollama 0.33.2, after 0.33.1 of 2026-08-28; LM Studio
0.4.20 of 2026-07-22 when these were set) once the port still answers what the
newer release's clients send.
"""

from __future__ import annotations

OLLAMA_VERSION = "0.33.2"
LMSTUDIO_VERSION = "0.4.20"
LMSTUDIO_BUILD = 1
