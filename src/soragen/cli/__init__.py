"""The `soragen` command line. The only package that prints or knows about exit codes.

Heavy imports (torch, transformers, diffusers) happen inside the commands, so `soragen --help`
answers at once. app.py holds what every command shares (the error handling, the checks, the
progress bars); generate.py, measure.py, train.py, models.py and serve.py the commands.
"""

from soragen.cli.app import main, run  # noqa: F401  (first: it notes when the command started)
from soragen.cli import generate, measure, train, models, serve  # noqa: F401,E402,I001  (each registers its commands, in this order)
