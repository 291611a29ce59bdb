"""Seeing attention: record weights per layer and head, and render them to the terminal,
pictures (matplotlib) and a self-contained web page."""

from .flow import lost_mass, rollout
from .record import AttentionRecord, LayerCapture, record

__all__ = ["AttentionRecord", "LayerCapture", "lost_mass", "record", "rollout"]
