# Single-frame processing per (visit, detector): ISR, characterize, calibrate.
# Always writes all three products; a CCD that cannot be calibrated gets a
# flagged CcdVisit row, an empty src and a header-only calexp failure record.


rule process_ccd:
    input:
        unpack(plan.process_ccd_inputs),
    output:
        calexp_path=paths.pattern("calexp"),
        src_path=paths.pattern("src"),
        ccdvisit_path=paths.pattern("ccdVisit"),
    params:
        step="process_ccd:process_ccd",
        image_format=plan.image_format,
        isr=plan.section("isr"),
        calibrate=plan.section("calibrate"),
    log:
        paths.root / "logs/process_ccd/{visit}/process_ccd_{visit}_{detector}.log",
    benchmark:
        paths.root / "benchmarks/process_ccd/{visit}/process_ccd_{visit}_{detector}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule ccdvisit_table:
    input:
        input_paths=plan.per_ccd_paths("ccdVisit"),
    output:
        output_path=paths.path("CcdVisit"),
    params:
        step="tables:consolidate_table",
        table="CcdVisit",
    log:
        paths.root / "logs/tables/CcdVisit.log",
    benchmark:
        paths.root / "benchmarks/tables/CcdVisit.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule source_table:
    input:
        input_paths=plan.per_ccd_paths("src"),
    output:
        output_path=paths.path("Source"),
    params:
        step="tables:consolidate_table",
        table="Source",
    log:
        paths.root / "logs/tables/Source.log",
    benchmark:
        paths.root / "benchmarks/tables/Source.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"
