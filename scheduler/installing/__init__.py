"""Obtaining llama-server: configured, on PATH, cached, or built from the pinned llama.cpp
source; and what ``corral doctor`` reports."""
