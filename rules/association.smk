# Association (associationDriver): one job per (tract, patch) groups the DIASources
# of its inner region into DIAObjects; forced photometry of the DIAObjects
# (forcedPhotCcdDiaDriver) on every CCD-visit's difference image and calexp; the
# consolidated DiaObject and DiaForcedSource tables.


rule associate_patch:
    input:
        unpack(plan.association_inputs),
    output:
        dia_object_path=paths.pattern("diaObjectTable"),
        dia_assoc_path=paths.pattern("diaAssoc"),
    params:
        step="association:associate_patch",
        bands=plan.science_bands,
        association=plan.section("association"),
    log:
        paths.root / "logs/association/{tract}/associate_{tract}_{patch}.log",
    benchmark:
        paths.root / "benchmarks/association/{tract}/associate_{tract}_{patch}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule dia_forced_ccd:
    input:
        unpack(plan.dia_forced_inputs),
    output:
        forced_path=paths.pattern("diaForcedSource"),
    params:
        step="association:dia_forced_ccd",
    log:
        paths.root / "logs/diaForced/{visit}/diaForcedSource_{visit}_{detector}.log",
    benchmark:
        paths.root / "benchmarks/diaForced/{visit}/diaForcedSource_{visit}_{detector}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule dia_object_table:
    input:
        input_paths=plan.per_patch_paths("diaObjectTable"),
    output:
        output_path=paths.path("DiaObject"),
    params:
        step="tables:consolidate_table",
        table="DiaObject",
    log:
        paths.root / "logs/tables/DiaObject.log",
    benchmark:
        paths.root / "benchmarks/tables/DiaObject.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule dia_forced_source_table:
    input:
        input_paths=plan.diffim_paths("diaForcedSource"),
    output:
        output_path=paths.path("DiaForcedSource"),
    params:
        step="tables:consolidate_table",
        table="DiaForcedSource",
    log:
        paths.root / "logs/tables/DiaForcedSource.log",
    benchmark:
        paths.root / "benchmarks/tables/DiaForcedSource.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"
