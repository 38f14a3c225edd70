"""One module per section of bench/run.py; each has run(settings) -> Section."""
