"""`slider-cn ui`: a local web page to configure, preview, launch and watch a slider run.

`app.create_app` is the FastAPI app over one workspace folder; `server.serve` binds it and
runs uvicorn. The page (`static/`) is plain HTML, CSS and a small script, served by the app.
"""

from slider_cn.ui.app import create_app
from slider_cn.ui.server import serve

__all__ = ["create_app", "serve"]
