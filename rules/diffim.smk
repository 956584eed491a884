# Difference imaging (imageDifference): each calexp minus its band's template
# coadds warped to it, one job per (visit, detector); DIASources per CCD, then
# the consolidated DiaSource table (with the diaObjectIds of association where it
# runs) and the per-CCD record (DiaCcdVisit).


rule subtract_ccd:
    input:
        unpack(plan.diffim_inputs),
    output:
        difference_path=paths.pattern("differenceExp"),
        dia_source_path=paths.pattern("diaSrc"),
        dia_ccd_path=paths.pattern("diaCcd"),
    params:
        step="diffim:subtract_ccd",
        patches=plan.warp_patches,
        diffim=plan.subtraction_section(),
    log:
        paths.root / "logs/diffim/{visit}/diffim_{visit}_{detector}.log",
    benchmark:
        paths.root / "benchmarks/diffim/{visit}/diffim_{visit}_{detector}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule dia_source_table:
    input:
        input_paths=plan.diffim_paths("diaSrc"),
        assoc_paths=plan.per_patch_paths("diaAssoc") if plan.association_enabled else [],
    output:
        output_path=paths.path("DiaSource"),
    params:
        step="association:dia_source_table",
    log:
        paths.root / "logs/tables/DiaSource.log",
    benchmark:
        paths.root / "benchmarks/tables/DiaSource.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule dia_ccd_visit_table:
    input:
        input_paths=plan.diffim_paths("diaCcd"),
    output:
        output_path=paths.path("DiaCcdVisit"),
    params:
        step="tables:consolidate_table",
        table="DiaCcdVisit",
    log:
        paths.root / "logs/tables/DiaCcdVisit.log",
    benchmark:
        paths.root / "benchmarks/tables/DiaCcdVisit.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


# Source injection (diffim.injection.enabled): point sources put into each differenced
# calexp, differenced and searched again; DiaInjection says which were found.
rule inject_ccd:
    input:
        unpack(plan.injection_inputs),
    output:
        injection_path=paths.pattern("diaInjection"),
    params:
        step="diffim:inject_ccd",
        patches=plan.warp_patches,
        diffim=plan.section("diffim"),
    log:
        paths.root / "logs/diffim/{visit}/inject_{visit}_{detector}.log",
    benchmark:
        paths.root / "benchmarks/diffim/{visit}/inject_{visit}_{detector}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule dia_injection_table:
    input:
        input_paths=plan.diffim_paths("diaInjection"),
    output:
        output_path=paths.path("DiaInjection"),
    params:
        step="tables:consolidate_table",
        table="DiaInjection",
    log:
        paths.root / "logs/tables/DiaInjection.log",
    benchmark:
        paths.root / "benchmarks/tables/DiaInjection.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"
