# Ingest: validate every input file's headers and write the exposure registry.


rule ingest_raw:
    input:
        plan.input_files,
    output:
        registry_path=paths.path("registry"),
        problems_path=paths.path("ingest_problems"),
    params:
        step="ingest:ingest_raw",
        raw_dir=plan.raw_dir,
        image_format=plan.image_format,
        on_bad_file=plan.config["input"]["on_bad_file"],
        expected_files=plan.input_files,
    log:
        paths.root / "logs/ingest_raw.log",
    benchmark:
        paths.root / "benchmarks/ingest_raw.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"
