"""The browser UI for chat sessions: ``anymodal serve`` (a small Starlette app and one HTML page).

Install its dependencies with ``pip install "anymodal[ui]"``.
"""

from __future__ import annotations

__all__ = ["create_app", "serve"]


def __getattr__(name: str):  # keep `import anymodal.ui` free of starlette until the app is wanted
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
