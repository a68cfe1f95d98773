"""NanoSLG entry point: `python run.py [group=option ...] [key=value ...]` (Hydra).

python run.py                                   # serve the demo model on 127.0.0.1:8000
python run.py mode=generate prompt="Hello"      # print one completion
python run.py mode=bench bench=offline model=llama3-8b
"""

import os
import sys
import time

# The serving banner says how long start-up took. Set, not defaulted: a server the bench spawns would
# otherwise inherit the bench's own start.
os.environ["NANOSLG_STARTED"] = repr(time.time())

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from nanoslg.core.config import register_schema  # noqa: E402
from nanoslg.core.config_errors import as_config_error  # noqa: E402
from nanoslg.core.errors import CONFIG_ERROR_EXIT  # noqa: E402

register_schema()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(node: DictConfig) -> None:
    from nanoslg.cli import run

    code = run(node)
    if code:  # exiting on success would end a Hydra multirun after its first job
        sys.exit(code)


if __name__ == "__main__":
    # Hydra prints its own composition errors and exits 1; raised instead, they are said like every
    # other config mistake (the key, close matches, the keys there) with the same exit code.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except Exception as e:
        err = as_config_error(e)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
