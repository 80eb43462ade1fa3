"""`python -m pretrain [overrides]`: compose the Hydra config, build the trainer, run. No logic."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pretrain.config import ConfigError, register_schema, to_config

register_schema()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        config = to_config(cfg)
        from pretrain.trainer import Trainer  # heavy imports only after the config is valid

        Trainer(config).fit()
    except ConfigError as e:
        sys.exit(f"error: {e}")


def _drop_launcher_args(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends `--local_rank=N` (also exported as LOCAL_RANK), which
    Hydra would reject as an unknown argument."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank="):
            continue
        elif arg == "--local_rank":
            skip = True
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.argv = _drop_launcher_args(sys.argv)
    main()
