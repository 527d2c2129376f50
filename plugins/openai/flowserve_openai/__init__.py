"""FlowServe's OpenAI-compatible frontend (``flowserve-openai``).

``build_app(server)`` (in ``flowserve_openai.app``) makes the starlette app; the ``openai``
frontend serves it with uvicorn. See docs/api.md for every endpoint, parameter and error.
"""

__version__ = "0.1.0"
