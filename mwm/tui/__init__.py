"""The live console (``mwm tui``): a Textual client of mwm's HTTP API.

The package never imports mwm's internals: it talks to a running mwm, local or remote, only
through the HTTP API (``mwm.client``). Textual is imported by the screen modules only, so the
pure helpers (``fmt``) and the API side (``data``) can be used and tested without it.
"""
