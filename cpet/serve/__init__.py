"""``cpet serve``: many tasks over HTTP from one shared backbone (``pip install 'cpet[serve]'``).

``engine`` (batcher, task bank, lifecycles) needs only torch; ``app`` (FastAPI) imports the serve extra.
"""
