"""Serve the compact app: python app.py (host and port from COMPACT_HOST / COMPACT_PORT)."""

import os

from ui import build_app

if __name__ == "__main__":
    build_app().queue().launch(server_name=os.environ.get("COMPACT_HOST", "127.0.0.1"),
                               server_port=int(os.environ.get("COMPACT_PORT", "7860")))
