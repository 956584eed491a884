# Master calibrations per detector (flats per band) and defect masks. A
# detector without raw frames of a type gets no master of that type, and ISR
# skips the matching step (and says so).


rule master_bias:
    input:
        unpack(plan.master_bias_inputs),
    output:
        output_path=paths.pattern("bias"),
    params:
        step="calibs:make_master_bias",
    log:
        paths.root / "logs/calib/master_bias_{detector}.log",
    benchmark:
        paths.root / "benchmarks/calib/master_bias_{detector}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule master_dark:
    input:
        unpack(plan.master_dark_inputs),
    output:
        output_path=paths.pattern("dark"),
    params:
        step="calibs:make_master_dark",
    log:
        paths.root / "logs/calib/master_dark_{detector}.log",
    benchmark:
        paths.root / "benchmarks/calib/master_dark_{detector}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule master_flat:
    input:
        unpack(plan.master_flat_inputs),
    output:
        output_path=paths.pattern("flat"),
    params:
        step="calibs:make_master_flat",
    log:
        paths.root / "logs/calib/master_flat_{band}_{detector}.log",
    benchmark:
        paths.root / "benchmarks/calib/master_flat_{band}_{detector}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule defects:
    input:
        unpack(plan.defects_inputs),
    output:
        output_path=paths.pattern("defects"),
    params:
        step="calibs:make_defects",
    log:
        paths.root / "logs/calib/defects_{detector}.log",
    benchmark:
        paths.root / "benchmarks/calib/defects_{detector}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"
