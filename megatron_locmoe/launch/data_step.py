"""The data step: the corpus the plan's runs read, built on this node before the first run.

A preset's ``prepare_data`` names the recipe; the plan holds where it writes
(:mod:`megatron_locmoe.launch.plan` reads and checks the prefixes in the flags):

- ``pydoc``: the offline corpus at the run's ``--data-path`` (``python -m
  megatron_locmoe.sim.data``);
- ``pydoc-domains``: one corpus domain per node, ``DIR/domain<k>``;
- ``realtext``: the real-text corpus (``python -m megatron_locmoe.data.corpus``,
  docs/corpus.md) in the one directory of the datasets the runs read.

Each is built only when a file it writes is missing; the offline corpus and the domains are
written under a scratch name and renamed into place (indexes last), so a node never reads half
a corpus. The builders are imported inside the functions that use them: the launcher loads no
numpy for ``--help`` or a dry run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from megatron_locmoe.launch.plan import Plan, corpus_files, has_dataset
from megatron_locmoe.launch.presets import PresetError


def prepare_data(plan: Plan) -> None:
    """Build what the plan's data step writes, where it is missing: the per-node domains, the
    real-text corpus, or the offline corpus at the run's --data-path.

    Every node builds its own copy when it has none (the corpus is deterministic, so copies on
    a shared file system are identical); files are renamed into place, index last."""
    if plan.domain_prefixes:
        _prepare_domains(plan.domain_prefixes)
        return
    if plan.corpus_prefixes:
        _prepare_corpus(plan.corpus_prefixes)
        return
    prefix = plan.data_prefix
    if not prefix or has_dataset(prefix):
        return
    # numpy: only to build
    from megatron_locmoe.sim.data import build_indexed_dataset, dataset_files

    print(f"[launch] building the offline corpus at {prefix}", flush=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    build_indexed_dataset(tmp)
    for src, dst in zip(dataset_files(tmp), dataset_files(prefix), strict=True):
        os.replace(src, dst)


def _prepare_domains(prefixes: list[str]) -> None:
    """One corpus domain per node under the prefixes' directory, built (into a scratch
    directory, then renamed into place, indexes last) when any file is missing."""
    root = Path(prefixes[0]).parent
    files = [Path(f) for f in corpus_files(prefixes)]
    if all(f.exists() for f in files):
        return
    from megatron_locmoe.sim.data import build_domain_datasets  # numpy: only to build

    print(f"[launch] building {len(prefixes)} per-node corpus domains in {root}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        build_domain_datasets(tmp, len(prefixes))
        for f in sorted(files, key=lambda f: f.suffix == ".idx"):
            os.replace(Path(tmp) / f.name, f)


def _prepare_corpus(prefixes: list[str], build=None) -> None:
    """The real-text corpus in the prefixes' directory: built by ``megatron_locmoe.data.corpus``
    (``build``: its main, for tests) when a dataset the runs read is missing; a prefix the
    build does not write is refused by name."""
    root = str(Path(prefixes[0]).parent)

    def missing() -> list[str]:
        return [f for f in corpus_files(prefixes) if not Path(f).exists()]

    if not missing():
        return
    print(f"[launch] building the real-text corpus in {root} (docs/corpus.md)", flush=True)
    if build is None:
        from megatron_locmoe.data.corpus import main as build  # its downloads: only when building
    code = build(["--out", root])
    if code:
        raise PresetError(
            f"building the real-text corpus in {root} failed (exit {code}); without the "
            "package registries, build it elsewhere and carry it in (docs/corpus.md)"
        )
    if missing():
        raise PresetError(
            f"the real-text corpus in {root} has no {', '.join(sorted(set(missing())))}: the "
            "data flags name a dataset the corpus does not write (see docs/corpus.md's list)"
        )
