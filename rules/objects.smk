# Objects on the deep coadds (detectCoaddSources, mergeCoaddDetections,
# deblending, measureCoaddSources, mergeCoaddMeasurements) as one job per patch,
# and forced photometry of a tract's Objects on every calexp (forcedPhotCcd).


rule coadd_objects:
    input:
        unpack(plan.objects_inputs),
    output:
        object_path=paths.pattern("objectTable"),
    params:
        step="objects:measure_patch_objects",
        bands=plan.science_bands,
        objects=plan.section("objects"),
    log:
        paths.root / "logs/objects/{tract}/objectTable_{tract}_{patch}.log",
    benchmark:
        paths.root / "benchmarks/objects/{tract}/objectTable_{tract}_{patch}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule forced_phot_ccd:
    input:
        unpack(plan.forced_inputs),
    output:
        forced_path=paths.pattern("forcedSource"),
    params:
        step="objects:forced_phot_ccd",
    log:
        paths.root / "logs/forced/{visit}/forcedSource_{visit}_{detector}_{tract}.log",
    benchmark:
        paths.root / "benchmarks/forced/{visit}/forcedSource_{visit}_{detector}_{tract}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule object_table:
    input:
        input_paths=plan.per_patch_paths("objectTable"),
    output:
        output_path=paths.path("Object"),
    params:
        step="tables:consolidate_table",
        table="Object",
    log:
        paths.root / "logs/tables/Object.log",
    benchmark:
        paths.root / "benchmarks/tables/Object.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule forced_source_table:
    input:
        input_paths=plan.forced_paths(),
    output:
        output_path=paths.path("ForcedSource"),
    params:
        step="tables:consolidate_table",
        table="ForcedSource",
    log:
        paths.root / "logs/tables/ForcedSource.log",
    benchmark:
        paths.root / "benchmarks/tables/ForcedSource.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"
