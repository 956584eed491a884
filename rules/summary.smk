# The run summary: inputs, skipped inputs (and, as stages land, skipped CCDs).


rule run_summary:
    input:
        registry_path=paths.path("registry"),
        problems_path=paths.path("ingest_problems"),
        ccdvisit_table_path=paths.path("CcdVisit"),
        coadd_paths=plan.coadd_paths(),
        object_table_path=paths.path("Object"),
        **plan.summary_dia_inputs(),
    output:
        summary_path=paths.path("run_summary"),
    params:
        step="summary:write_run_summary",
    log:
        paths.root / "logs/run_summary.log",
    benchmark:
        paths.root / "benchmarks/run_summary.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"
