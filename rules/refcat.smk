# Reference catalog: read through the column map, sharded on the sky (HEALPix)
# so each CCD job loads only the shards around it.


rule shard_refcat:
    input:
        refcat_path=plan.refcat_path,
    output:
        manifest_path=paths.path("refcat_manifest"),
    params:
        step="refcat:shard_refcat",
        columns=plan.refcat_columns,
        nside=64,
    log:
        paths.root / "logs/shard_refcat.log",
    benchmark:
        paths.root / "benchmarks/shard_refcat.tsv"
    conda:
        "../envs/drp.yaml"
    script:
        "../scripts/run_step.py"
