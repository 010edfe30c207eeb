"""Evaluation (DESIGN §11): numbers a user can reproduce with one command.

    toyworld.py     `tapestry eval toyworld`: generate the fixed ToyWorld benchmark, score it with
                    the exact judge, resumable per sample; ablations run it over the same scenes
    report.py       report.md / report.html / plots (matplotlib) / the --json summary
    judge.py        the LLM-judge client over tapestry.data.providers: cached, retried, budgeted;
                    a failed judgement is *missing* with its reason, never a score of 0
    protocols/      the papers' judge protocols (InterleaveBench, DuetGen, ILScore, OpenING, ISG),
                    each with its prompts, checks and aggregation, and the paper it comes from
    loaders.py      OpenING (test_data.jsonl) and ISG-Bench (ISG-Bench.jsonl) into Documents
    runner.py       a protocol over a set of samples, resumable, with a report
    metrics.py      embedding metrics with injectable encoders; FID/KID through torchmetrics
    cli.py          `tapestry eval ...`
"""
