# Quality assessment: the run's metrics.json and the figures that
# `snakemake --report report.html` gathers (captions in report/).


rule metrics:
    input:
        **plan.metrics_inputs(),
    output:
        metrics_path=paths.path("metrics"),
    params:
        step="qa:write_metrics",
        template=plan.section("template"),
        qa=plan.section("qa"),
    log:
        paths.root / "logs/qa/metrics.log",
    benchmark:
        paths.root / "benchmarks/qa/metrics.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule qa_ccd_visits:
    input:
        ccdvisit_table_path=paths.path("CcdVisit"),
    output:
        plot_path=report(
            paths.path("qaCcdVisitPlot"),
            caption="../report/ccd_visits.rst",
            category="1. Single frame",
            labels={"figure": "CCD-visit quality"},
        ),
        failed_path=report(
            paths.path("qaFailedCcds"),
            caption="../report/failed_ccds.rst",
            category="1. Single frame",
            labels={"figure": "flagged and failed CCD-visits"},
        ),
    params:
        step="qa:plot_ccd_visits",
    log:
        paths.root / "logs/qa/ccd_visits.log",
    benchmark:
        paths.root / "benchmarks/qa/ccd_visits.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule qa_color_image:
    input:
        unpack(plan.color_image_inputs),
    output:
        plot_path=report(
            paths.pattern("qaColorImage"),
            caption="../report/color_image.rst",
            category="2. Coadds",
            labels={"tract": "{tract}", "patch": "{patch}"},
        ),
    params:
        step="qa:plot_color_image",
    log:
        paths.root / "logs/qa/color_{tract}_{patch}.log",
    benchmark:
        paths.root / "benchmarks/qa/color_{tract}_{patch}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule qa_dia_cutouts:
    input:
        dia_source_table_path=paths.path("DiaSource"),
    output:
        plot_path=report(
            paths.path("qaDiaCutouts"),
            caption="../report/dia_cutouts.rst",
            category="3. Difference imaging",
            labels={"figure": "DIASource cut-outs"},
        ),
    params:
        step="qa:plot_dia_cutouts",
        qa=plan.section("qa"),
    log:
        paths.root / "logs/qa/dia_cutouts.log",
    benchmark:
        paths.root / "benchmarks/qa/dia_cutouts.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule qa_light_curves:
    input:
        dia_forced_table_path=paths.path("DiaForcedSource"),
        dia_object_table_path=paths.path("DiaObject"),
        dia_source_table_path=paths.path("DiaSource"),
    output:
        plot_path=report(
            paths.path("qaLightCurves"),
            caption="../report/light_curves.rst",
            category="3. Difference imaging",
            labels={"figure": "light curves"},
        ),
    params:
        step="qa:plot_light_curves",
        qa=plan.section("qa"),
    log:
        paths.root / "logs/qa/light_curves.log",
    benchmark:
        paths.root / "benchmarks/qa/light_curves.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule qa_injection:
    input:
        dia_injection_table_path=paths.path("DiaInjection"),
    output:
        plot_path=report(
            paths.path("qaInjectionPlot"),
            caption="../report/injection.rst",
            category="3. Difference imaging",
            labels={"figure": "source injection"},
        ),
    params:
        step="qa:plot_injection",
    log:
        paths.root / "logs/qa/injection.log",
    benchmark:
        paths.root / "benchmarks/qa/injection.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule qa_truth:
    input:
        metrics_path=paths.path("metrics"),
        source_table_path=paths.path("Source"),
        truth_object_path=paths.path("truth_object"),
    output:
        plot_path=report(
            paths.path("qaTruthPlot"),
            caption="../report/truth.rst",
            category="4. Against the simulation's truth",
            labels={"figure": "quality vs truth"},
        ),
    params:
        step="qa:plot_truth",
    log:
        paths.root / "logs/qa/truth.log",
    benchmark:
        paths.root / "benchmarks/qa/truth.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"
