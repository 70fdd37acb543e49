"""Serve the compact app: python app.py (host and port from Gradio's GRADIO_SERVER_NAME /
GRADIO_SERVER_PORT, or from COMPACT_HOST / COMPACT_PORT, which take precedence where set).

Models load lazily, on the first event that needs one, so the page is up in seconds.
"""

from ui import build_app
from ui.app import launch

if __name__ == "__main__":
    launch(build_app())
