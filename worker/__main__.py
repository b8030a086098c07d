import sys
import warnings

from llm_pool_worker.cli import main

if __spec__ is not None and not __spec__.name.startswith("llm_pool_worker."):  # `python -m worker`, until 0.3
    warnings.warn("`python -m worker` is now `python -m llm_pool_worker` (or `llm-worker run`)", DeprecationWarning,
                  stacklevel=1)
main(["run", *sys.argv[1:]])
