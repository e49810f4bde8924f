"""`ptlab-train`'s entry point. A plain `--help` is answered here, from conf/ and ptlab's help
template, without starting Hydra, whose own listing of the config groups deep-copies its config
store about a hundred times (3 s on 2 cores); the text is the one Hydra prints (a test compares
them). Everything else is `ptlab.cli.train.main`."""

from __future__ import annotations

import os
import string
import sys


def help_text() -> str:
    """conf/hydra/help/ptlab.yaml's template with the user-facing groups and their values."""
    from omegaconf import OmegaConf

    from ptlab.config.compose import CONF

    spec = OmegaConf.create({"hydra": {"help": OmegaConf.load(CONF / "hydra" / "help" / "ptlab.yaml")}})
    template = OmegaConf.to_container(spec, resolve=True)["hydra"]["help"]["template"]
    groups = sorted(
        path.name
        for path in CONF.iterdir()
        if path.is_dir() and path.name != "hydra" and any(path.glob("*.yaml"))
    )
    listing = "".join(
        f"{group}: {', '.join(sorted(path.stem for path in (CONF / group).glob('*.yaml')))}\n"
        for group in groups
    )
    return string.Template(template).substitute(
        APP_CONFIG_GROUPS=listing, HYDRA_CONFIG_GROUPS="", FLAGS_HELP="", CONFIG=""
    )


def main() -> None:
    if sys.argv[1:] in (["--help"], ["-h"]):
        try:
            print(help_text(), flush=True)
        except BrokenPipeError:  # `ptlab-train --help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            sys.exit(1)
        return
    from ptlab.cli.train import main as train

    train()


if __name__ == "__main__":
    main()
