"""NanoSLG entry point: `python run.py [group=option ...] [key=value ...]` (Hydra).

python run.py                                   # serve the demo model on 127.0.0.1:8000
python run.py mode=generate prompt="Hello"      # print one completion
python run.py mode=bench bench=offline model=llama3-8b
"""

import sys

import hydra
from omegaconf import DictConfig

from nanoslg.core.config import register_schema

register_schema()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(node: DictConfig) -> None:
    from nanoslg.cli import run

    code = run(node)
    if code:  # exiting on success would end a Hydra multirun after its first job
        sys.exit(code)


if __name__ == "__main__":
    main()
