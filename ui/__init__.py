"""The Gradio app: a thin layer over compact/, one module per tab."""

from ui.app import build_app

__all__ = ["build_app"]
