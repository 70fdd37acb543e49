"""The Gradio app: a thin layer over compact/."""

from ui.app import build_app

__all__ = ["build_app"]
