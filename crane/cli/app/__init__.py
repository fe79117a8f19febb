"""``python -m crane app``: inspection and calibration in the browser, and an HTTP API (Gradio).

* :mod:`.command`: the options and the server's life (``build_parser``, ``main``);
* :mod:`.backend`: the work, done with the command line's own helpers (the one module importing them);
* :mod:`.page`: the Gradio page and the ``predict`` API endpoint;
* :mod:`.uploads`: uploaded files and zips into the app's working folder, with limits.

Gradio is an optional extra (``pip install -e '.[app]'``); nothing in :mod:`crane` imports this package.
"""
