# Sky map, warps and coadds (the Cookbook's makeDiscreteSkyMap / makeSkyMap,
# makeCoaddTempExp and assembleCoadd). Which patches each CCD feeds is known
# at parse time (WorkflowPlan), so a dry run lists every job.


rule make_skymap:
    output:
        skymap_path=paths.path("skyMap"),
    params:
        step="coadd:write_skymap",
        skymap=plan.skymap_definition(),
    log:
        paths.root / "logs/skymap/make_skymap.log",
    benchmark:
        paths.root / "benchmarks/skymap/make_skymap.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


# One job per CCD writes its warps onto every patch it overlaps: a direct warp,
# a warp PSF-matched to the template model PSF (template-eligible CCDs only)
# and one PSF-matched to the wider model that deep coadds use to find artifacts.
# They are deleted once every coadd that reads them is made, unless keep_warps.
WARP_DIR = directory(paths.pattern("warpDir"))


rule warp:
    input:
        unpack(plan.warp_inputs),
    output:
        warp_dir=WARP_DIR if plan.config["keep_warps"] else temp(WARP_DIR),
    params:
        step="coadd:make_warps",
        patches=plan.warp_patches,
        coadd=plan.section("coadd"),
        template=plan.section("template"),
    log:
        paths.root / "logs/warp/{visit}/warp_{visit}_{detector}.log",
    benchmark:
        paths.root / "benchmarks/warp/{visit}/warp_{visit}_{detector}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule deep_coadd:
    input:
        unpack(plan.coadd_inputs),
    output:
        coadd_path=paths.pattern("deepCoadd"),
        coadd_psf_path=paths.pattern("deepCoaddPsf"),
    params:
        step="coadd:assemble_deep_coadd",
        coadd=plan.section("coadd"),
        template=plan.section("template"),
    log:
        paths.root / "logs/coadd/{tract}/{patch}/deepCoadd_{tract}_{patch}_{band}.log",
    benchmark:
        paths.root / "benchmarks/coadd/{tract}/{patch}/deepCoadd_{tract}_{patch}_{band}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"


rule template_coadd:
    input:
        unpack(plan.template_coadd_inputs),
    output:
        coadd_path=paths.pattern("templateCoadd"),
        coadd_psf_path=paths.pattern("templateCoaddPsf"),
    params:
        step="coadd:assemble_template_coadd",
        coadd=plan.section("coadd"),
        template=plan.section("template"),
    log:
        paths.root / "logs/coadd/{tract}/{patch}/templateCoadd_{tract}_{patch}_{band}.log",
    benchmark:
        paths.root / "benchmarks/coadd/{tract}/{patch}/templateCoadd_{tract}_{patch}_{band}.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"
