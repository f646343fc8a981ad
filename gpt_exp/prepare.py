"""`python -m gpt_exp.prepare [overrides]`: build the token cache that `python -m gpt_exp.run` with the same
overrides reads (it then starts at once), on every core; an interrupted prepare goes on where it stopped.
"""

from __future__ import annotations

import logging
import sys

from omegaconf import OmegaConf

from gpt_exp.cli import command, compose_run_config
from gpt_exp.config import DataSource
from gpt_exp.data.cache import prepare_tokens

USAGE = """usage: python -m gpt_exp.prepare [data=NAME] [data.path=FILE_OR_DIR] [data.cache_dir=DIR] [KEY=VALUE]...
                                 [--cfg job]

Builds the token cache that `python -m gpt_exp.run` with the same overrides reads (it then starts at once).
An interrupted prepare keeps its finished shards: run the same command again to continue."""


@command
def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(USAGE)
        return 0
    show = argv[-2:] == ["--cfg", "job"]
    cfg = compose_run_config(argv[:-2] if show else argv)
    if show:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg.data)), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    # data=mix: each source is a corpus with a cache of its own, as the run reads it
    corpora = ({f"data.sources.{name}.path": cfg.data.source_config(name) for name in sorted(cfg.data.sources)}
               if cfg.data.source == DataSource.mix else {"data.path": cfg.data})
    for key, data in corpora.items():
        try:
            cache = prepare_tokens(data, key)
        except KeyboardInterrupt:
            print("interrupted: the finished shards are kept; run the same command to go on", file=sys.stderr)
            return 130
        print(f"token cache ready: {cache.num_tokens:,} tokens, {cache.num_documents:,} document(s), "
              f"{len(cache.shard_paths)} shard(s) in {cache.manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
