"""Data engines: raw videos (and later images and web pages) -> interleaved training Documents.

    operators/   small pure steps over records, each a frozen config dataclass with a version
    providers/   model calls: OpenAI-compatible client, offline provider, cache, budget
    pipelines/   named compositions of operators (`video-story`, `video-state-change`)
    executors/   where the work runs: `local` process pool or `ray` (Ray Data)
    engine.py    ordered commits to webdataset shards, resume manifest, rejection log, summary
    cli.py       `tapestry data video ...`
"""
